// One whole answer: node unary.mjs ROUTER
import { Weir } from "../dist/index.js";

const weir = new Weir(process.argv[2]);
const answer = await weir.complete("What is a weir?", { model: "sim-small", maxTokens: 16, timeoutMs: 10_000 });
if (!answer.text || answer.usage.total_tokens !== answer.usage.input_tokens + answer.usage.output_tokens) {
  throw new Error(`unexpected answer ${JSON.stringify(answer.response)}`);
}
console.log(`unary model=${answer.model} tokens=${answer.usage.total_tokens} text=${JSON.stringify(answer.text)}`);
weir.close();
