# Recipe exploration for the toy generator on a lent GPU (see docs/toy.md): trains
# variants in parallel, then measures generation accuracy and heat-map placement.
set -x
python -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -1
python -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name(0))" || exit 1
export PYTHONPATH=$PWD
W="--world-cache /tmp/world.pt"
python -m toy.train_gen --out /tmp/w0 --device cuda --threads 16 $W --vae-steps 1 --unet-steps 1 > $OUT/world.log 2>&1 || exit 1
run() { name=$1; sheet=$2; shift 2
  ( python -m toy.train_gen --out /tmp/$name --device cuda --threads 1 $W --log-every 500 "$@" > $OUT/$name.log 2>&1 &&
    python bench/quality.py --sd /tmp/$name --gen-only --prompts 96 --device cuda --batch 32 $sheet >> $OUT/$name.log 2>&1 &&
    python bench/quality.py --sd /tmp/$name --gen-only --prompts 96 --device cuda --batch 32 --guidance 4 >> $OUT/$name.log 2>&1 ) &
}
run base "--sheet $OUT/base.png"
run big "" --unet-channels 64,128,128 --vae-channels 32,64,64
run noattn "" --attn-weight 0
run long "" --unet-steps 4500
run biglong "--sheet $OUT/biglong.png" --unet-channels 64,128,128 --vae-channels 32,64,64 --unet-steps 4500
wait
grep -h '"bench"' $OUT/*.log
