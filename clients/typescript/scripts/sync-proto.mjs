// Copies Weir's API (../../proto/weir) into proto/, which the package ships and loads at runtime.
// Run after changing proto/; ./tests/run fails when the copy is stale. proto/google/rpc holds the
// two googleapis files (status, error_details; Apache 2.0) the error details are decoded with.
import { cpSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(dirname(fileURLToPath(import.meta.url)));
rmSync(join(here, "proto", "weir"), { recursive: true, force: true });
cpSync(join(here, "..", "..", "proto", "weir"), join(here, "proto", "weir"), { recursive: true });
