// The official TypeScript MCP SDK's client, as hosts embed it, driven one JSON command per stdin line.
//
// Usage: node ts_client.mjs CONFIG_JSON
//   CONFIG_JSON: {"sdk": "<dir holding node_modules/@modelcontextprotocol/sdk>",
//                 "command": "...", "args": [...], "env": {...}, "cwd": "...",
//                 "elicitation": ["form"] | ["form", "url"] | null}   (null: declare no elicitation capability)
// Commands (stdin): {"op": "list_tools"} | {"op": "call_tool", "name": ..., "arguments": {...}}
//   | {"op": "get_prompt", "name": ..., "arguments": {...}}
//   | {"op": "set_elicit", "action": "accept"|"decline"|"cancel"|"error", "content": ...}
//   | {"op": "close"}
// Replies (stdout), one line per command: {"ok": true, "result": ..., "elicitations": [...]}
//   or {"ok": false, "error": {"message", "code", "data"}, "elicitations": [...]}. `elicitations` lists the
//   elicitation requests received since the previous reply. The first line is {"ok": true, "ready": {...}}
//   once connected (or an error when the connection failed).
import { createInterface } from "node:readline";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const config = JSON.parse(process.argv[2] ?? "{}");
// The SDK lives in the test cache, not next to this script, so it is imported by path.
const esm = join(config.sdk, "node_modules", "@modelcontextprotocol", "sdk", "dist", "esm");
const load = (rel) => import(pathToFileURL(join(esm, rel)).href);
const { Client } = await load("client/index.js");
const { StdioClientTransport } = await load("client/stdio.js");
const { ElicitRequestSchema, McpError } = await load("types.js");

const REQUEST_TIMEOUT_MS = 300_000; // the Python side bounds every call; this only must not fire first

function write(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function errorOf(err) {
  if (err instanceof McpError) return { message: err.message, code: err.code, data: err.data ?? null };
  return { message: String(err?.message ?? err), code: null, data: null };
}

let elicitAnswer = { action: "decline" };
let seen = [];

const capabilities = {};
if (Array.isArray(config.elicitation)) {
  capabilities.elicitation = Object.fromEntries(config.elicitation.map((mode) => [mode, {}]));
}
const client = new Client({ name: "vast-mcp-tests-ts", version: "1.0.0" }, { capabilities });
if (capabilities.elicitation) {
  client.setRequestHandler(ElicitRequestSchema, async (request) => {
    seen.push(request.params);
    const answer = elicitAnswer;
    if (answer.action === "error") throw new McpError(-32603, answer.content ?? "the user's client failed");
    return answer.content == null ? { action: answer.action } : { action: answer.action, content: answer.content };
  });
}

const transport = new StdioClientTransport({
  command: config.command,
  args: config.args ?? [],
  env: config.env ?? {},
  cwd: config.cwd,
  stderr: "inherit",
});

async function run(cmd) {
  switch (cmd.op) {
    case "list_tools":
      return await client.listTools(undefined, { timeout: REQUEST_TIMEOUT_MS });
    case "call_tool":
      return await client.callTool({ name: cmd.name, arguments: cmd.arguments ?? {} }, undefined, {
        timeout: REQUEST_TIMEOUT_MS,
      });
    case "get_prompt":
      return await client.getPrompt({ name: cmd.name, arguments: cmd.arguments ?? {} }, { timeout: REQUEST_TIMEOUT_MS });
    case "set_elicit":
      elicitAnswer = { action: cmd.action, content: cmd.content };
      return {};
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

try {
  await client.connect(transport);
} catch (err) {
  write({ ok: false, error: errorOf(err), elicitations: [] });
  process.exit(1);
}
write({ ok: true, ready: { server: client.getServerVersion(), capabilities: client.getServerCapabilities() } });

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    write({ ok: false, error: errorOf(err), elicitations: [] });
    continue;
  }
  if (cmd.op === "close") break;
  let reply;
  try {
    reply = { ok: true, result: await run(cmd) };
  } catch (err) {
    reply = { ok: false, error: errorOf(err) };
  }
  reply.elicitations = seen;
  seen = [];
  write(reply);
}
await client.close();
process.exit(0);
