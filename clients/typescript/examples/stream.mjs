// An answer token by token, then its usage: node stream.mjs ROUTER
import { Weir } from "../dist/index.js";

const weir = new Weir(process.argv[2]);
const stream = weir.stream("Tell me about rivers", { model: "sim-small" });
const deltas = [];
for await (const text of stream) deltas.push(text);
if (deltas.length < 2 || !stream.usage || stream.usage.output_tokens === 0) {
  throw new Error(`unexpected stream: ${deltas.length} deltas, usage ${JSON.stringify(stream.usage)}`);
}
console.log(`stream deltas=${deltas.length} output_tokens=${stream.usage.output_tokens}`);
weir.close();
