// A conversation the router remembers: node session.mjs ROUTER SESSIONS
import { Weir } from "../dist/index.js";

const weir = new Weir(process.argv[2], { sessionTarget: process.argv[3] });
const session = await weir.createSession("user-42", "sim-small");
const first = await weir.complete("My name is Ada.", { model: "sim-small", sessionId: session });
const second = await weir.complete("What is my name?", { model: "sim-small", sessionId: session });
if (second.usage.input_tokens <= first.usage.input_tokens) throw new Error("the session carried no context");
console.log(`session ${session} input_tokens ${first.usage.input_tokens} -> ${second.usage.input_tokens}`);
await weir.deleteSession(session);
weir.close();
