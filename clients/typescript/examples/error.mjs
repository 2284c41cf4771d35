// An error with its details: node error.mjs ROUTER
import { Weir, WeirError } from "../dist/index.js";

const weir = new Weir(process.argv[2]);
try {
  await weir.complete("hello", { model: "gpt-9" });
  throw new Error("an unknown model must be refused");
} catch (error) {
  if (!(error instanceof WeirError) || error.codeName !== "NOT_FOUND" || !error.reason) throw error;
  console.log(`error code=${error.codeName} reason=${error.reason} message=${JSON.stringify(error.details)}`);
}
try {
  await weir.complete([], { model: "sim-small" });
  throw new Error("a request without messages must be refused");
} catch (error) {
  if (!(error instanceof WeirError) || error.codeName !== "INVALID_ARGUMENT" || error.fieldViolations.length === 0) throw error;
  console.log(`error code=${error.codeName} field=${error.fieldViolations[0].field}`);
}
weir.close();
