// Validate an AsyncAPI document with the official parser (@asyncapi/parser).
//
//   node validate.mjs [FILE]     (no FILE, or "-": read the document from stdin)
//
// Prints the diagnostics of severity "error" as a JSON array of {code, message, path}
// on stdout. Exit status: 0 no errors, 1 errors found, 2 the document could not be read.
import { readFile } from "node:fs/promises";

import { DiagnosticSeverity, Parser } from "@asyncapi/parser";

async function readInput(path) {
  if (path && path !== "-") {
    return readFile(path, "utf8");
  }
  const chunks = [];
  for await (const chunk of process.stdin) {
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  let text;
  try {
    text = await readInput(process.argv[2]);
  } catch (error) {
    process.stderr.write(`validate.mjs: cannot read the document: ${error.message}\n`);
    return 2;
  }
  const diagnostics = await new Parser().validate(text);
  const errors = diagnostics
    .filter((d) => d.severity === DiagnosticSeverity.Error)
    .map((d) => ({ code: d.code, message: d.message, path: d.path.join(".") }));
  process.stdout.write(`${JSON.stringify(errors, null, 2)}\n`);
  return errors.length === 0 ? 0 : 1;
}

process.exitCode = await main();
