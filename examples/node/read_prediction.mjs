// Read one batchscore prediction straight from Redis, as README.md's "The Redis layout"
// describes it: no dependency, plain RESP over a socket, on one Redis or a Redis Cluster
// (a `MOVED` reply is followed to the node that holds the key).
//
//   node read_prediction.mjs redis://127.0.0.1:6379/0 predictions <row key or id>
//
// Prints the prediction as JSON (the same object the HTTP service and the CLI return), or
// `null` when the live version has no such row.
import { createHash } from "node:crypto";
import net from "node:net";

function encodeCommand(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.isBuffer(arg) ? arg : Buffer.from(String(arg));
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from("\r\n"));
  }
  return Buffer.concat(parts);
}

// One RESP reply from `buffer` at `at`: [value, next offset], or null when incomplete.
function parseReply(buffer, at) {
  const end = buffer.indexOf("\r\n", at);
  if (end < 0) return null;
  const kind = String.fromCharCode(buffer[at]);
  const line = buffer.toString("utf8", at + 1, end);
  if (kind === "+") return [line, end + 2];
  if (kind === "-") return [new Error(line), end + 2];
  if (kind === ":") return [Number(line), end + 2];
  if (kind === "$") {
    const size = Number(line);
    if (size < 0) return [null, end + 2];
    if (buffer.length < end + 2 + size + 2) return null;
    return [buffer.subarray(end + 2, end + 2 + size), end + 2 + size + 2];
  }
  if (kind === "*") {
    const count = Number(line);
    if (count < 0) return [null, end + 2];
    const items = [];
    let next = end + 2;
    for (let i = 0; i < count; i += 1) {
      const parsed = parseReply(buffer, next);
      if (parsed === null) return null;
      items.push(parsed[0]);
      next = parsed[1];
    }
    return [items, next];
  }
  throw new Error(`unexpected RESP reply type ${kind}`);
}

class Connection {
  constructor(host, port) {
    this.socket = net.createConnection({ host, port });
    this.socket.setTimeout(5000, () => this.socket.destroy(new Error("Redis timed out")));
    this.buffer = Buffer.alloc(0);
    this.waiting = [];
    this.socket.on("data", (chunk) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      for (;;) {
        const parsed = this.waiting.length ? parseReply(this.buffer, 0) : null;
        if (parsed === null) break;
        this.buffer = this.buffer.subarray(parsed[1]);
        this.waiting.shift().resolve(parsed[0]);
      }
    });
    this.socket.on("error", (error) => {
      for (const waiter of this.waiting.splice(0)) waiter.reject(error);
    });
  }

  send(...args) {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.socket.write(encodeCommand(args));
    });
  }

  close() {
    this.socket.end();
  }
}

class Client {
  constructor(url) {
    const parsed = new URL(url);
    this.password = parsed.password ? decodeURIComponent(parsed.password) : null;
    this.db = Number(parsed.pathname.replace("/", "") || 0);
    this.nodes = new Map();
    this.home = `${parsed.hostname}:${parsed.port || 6379}`;
  }

  async node(address) {
    if (!this.nodes.has(address)) {
      const [host, port] = [address.slice(0, address.lastIndexOf(":")), address.slice(address.lastIndexOf(":") + 1)];
      const connection = new Connection(host, Number(port));
      this.nodes.set(address, connection);
      if (this.password) await this.checked(await connection.send("AUTH", this.password));
      if (this.db) await this.checked(await connection.send("SELECT", this.db));
    }
    return this.nodes.get(address);
  }

  checked(reply) {
    if (reply instanceof Error) throw reply;
    return reply;
  }

  // A command to the node holding its key: a cluster answers MOVED with the right node.
  async command(...args) {
    let address = this.home;
    for (let hop = 0; hop < 3; hop += 1) {
      const reply = await (await this.node(address)).send(...args);
      if (reply instanceof Error && reply.message.startsWith("MOVED ")) {
        address = reply.message.split(" ")[2];
        continue;
      }
      return this.checked(reply);
    }
    throw new Error("too many MOVED redirections");
  }

  close() {
    for (const connection of this.nodes.values()) connection.close();
  }
}

function answer(model, proba, classes) {
  const label = proba >= model.threshold ? 1 : 0;
  return { label, class: classes[label] ?? String(label), proba, threshold: model.threshold, model_version: model.version };
}

export async function readPrediction(url, prefix, key) {
  const client = new Client(url);
  try {
    const tag = `{${prefix}}`;
    const version = await client.command("GET", `${tag}:current`);
    if (version === null) throw new Error("no prediction set is published yet");
    const [layoutJson, modelsJson, classesJson, scheme] = await client.command(
      "HMGET", `${tag}:manifest:${version}`, "layout", "row_models", "classes", "key_scheme",
    );
    if (layoutJson === null) {
      // A version in the first layout: one JSON string per row.
      const value = await client.command("GET", `${prefix}:${version}:${key}`);
      return value === null ? null : JSON.parse(value.toString("utf8"));
    }
    const layout = JSON.parse(layoutJson.toString("utf8"));
    const models = JSON.parse(modelsJson.toString("utf8"));
    const classes = classesJson ? JSON.parse(classesJson.toString("utf8")).map(String) : [];
    let digest;
    if (scheme !== null && scheme.toString("utf8") === "id") {
      digest = createHash("sha256").update(key, "utf8").digest();
    } else if (/^[0-9a-f]{64}$/.test(key)) {
      digest = Buffer.from(key, "hex");
    } else {
      return null; // not a feature-hash row key
    }
    const bucket = digest.readUInt32BE(0) % layout.buckets;
    const value = await client.command("HGET", `${layout.rows}${bucket}`, digest);
    if (value === null) return null;
    const probas = models.map((_, i) => value.readUIntBE(3 * i, 3) / 1e6);
    const top = answer(models[0], probas[0], classes);
    const prediction = {
      label: top.label, class: top.class, proba: top.proba, threshold: top.threshold,
      model: models[0].name, model_version: models[0].version,
    };
    if (models.length > 1) {
      prediction.models = Object.fromEntries(models.map((m, i) => [m.name, answer(m, probas[i], classes)]));
    }
    return prediction;
  } finally {
    client.close();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [url, prefix, key] = process.argv.slice(2);
  if (!key) {
    console.error("usage: node read_prediction.mjs <redis url> <prefix> <row key or id>");
    process.exit(2);
  }
  readPrediction(url, prefix, key).then(
    (prediction) => console.log(JSON.stringify(prediction)),
    (error) => {
      console.error(`error: ${error.message}`);
      process.exit(1);
    },
  );
}
