// dnd-atlas site: the semantic engine in a module worker, so that loading the
// model (seconds of WebAssembly work) and embedding queries never freeze the
// page. Messages: {id, op: "load", root, index} -> {id, value: {loadMs}};
// {id, op: "search", query, k, scope: [layer paths] | null} -> {id, value: {hits, total}};
// {id, op: "tokenize", texts} -> {id, value: [[ids]]}; errors -> {id, error: message}.
import { load } from "./search.mjs";

let engine = null;

const ops = {
  async load({ root, index }) {
    engine = engine || (await load(root, index));
    return { loadMs: engine.loadMs };
  },
  async search({ query, k, scope }) {
    return engine.search(query, k, scope ? new Set(scope) : null);
  },
  async tokenize({ texts }) {
    return texts.map((t) => engine.embedder.tokenize(t));
  },
};

self.onmessage = async (event) => {
  const { id, op } = event.data;
  try {
    self.postMessage({ id, value: await ops[op](event.data) });
  } catch (err) {
    self.postMessage({ id, error: String((err && err.message) || err) });
  }
};
