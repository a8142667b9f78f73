"""The segmenter stage: Segment Anything masks and RGBA assets."""
