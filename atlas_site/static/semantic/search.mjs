// dnd-atlas site: semantic search in the browser, no server. Loaded by
// atlas-semantic.js on the first search only (nothing large before that).
//
// Everything comes from the site's own origin, as data/semantic/index.json
// lists it (written by atlas_site/semantic.py): onnxruntime-web's wasm build,
// the atlas's ONNX embedder (model parts, tokenizer.json), the label texts and
// one vector per distinct text. The query is embedded as query/onnx_embedder.py
// does (WordPiece ids, the transformer, mean pooling, L2 normalization) and the
// neurons are ranked as `dnd-atlas search` ranks them (rank.mjs).
import { WordPiece } from "./wordpiece.mjs";
import { neuronsPerLayer, rankNeurons, similarities } from "./rank.mjs";

const FORMAT = 1;

async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`HTTP ${r.status} for ${url}`);
  return new Uint8Array(await r.arrayBuffer());
}

/** A file that is gzip-compressed on disk, inflated (unless the server already did). */
async function fetchInflated(url) {
  const bytes = await fetchBytes(url);
  if (bytes.length < 2 || bytes[0] !== 0x1f || bytes[1] !== 0x8b) return bytes;
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** The parts of a file split for static hosts (no part over 45 MiB), joined. */
async function fetchParts(root, parts, size) {
  const chunks = await Promise.all(parts.map((p) => fetchBytes(root + p)));
  const out = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  if (at !== size) throw new Error(`expected ${size} bytes, got ${at}`);
  return out;
}

function half(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

function toFloat32(bytes, dtype) {
  const buf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  if (dtype === "float32") return new Float32Array(buf);
  if (dtype === "float16") return Float32Array.from(new Uint16Array(buf), half);
  throw new Error(`unsupported vector type ${dtype}`);
}

function pool(data, n, dim, modes) {
  const out = new Float32Array(dim * modes.length);
  modes.forEach((mode, k) => {
    const v = out.subarray(k * dim, (k + 1) * dim);
    if (mode === "cls") v.set(data.subarray(0, dim));
    else if (mode === "max") {
      v.fill(-Infinity);
      for (let t = 0; t < n; t++) for (let j = 0; j < dim; j++) v[j] = Math.max(v[j], data[t * dim + j]);
    } else {
      for (let t = 0; t < n; t++) for (let j = 0; j < dim; j++) v[j] += data[t * dim + j];
      const d = mode === "mean" ? n : Math.sqrt(n);
      for (let j = 0; j < dim; j++) v[j] /= d;
    }
  });
  let norm = 0;
  for (const x of out) norm += x * x;
  norm = Math.sqrt(norm) || 1;
  for (let j = 0; j < out.length; j++) out[j] /= norm;
  return out;
}

class Embedder {
  constructor(ort, session, tokenizer, spec) {
    Object.assign(this, { ort, session, tokenizer, spec });
  }

  /** Token ids of a text, with special tokens, truncated as the manifest says. */
  tokenize(text) {
    const t = this.spec.lowercase ? text.toLowerCase() : text;
    return this.tokenizer.encode(t, this.spec.max_seq_length);
  }

  /** The unit vector of one text (a Float32Array). */
  async embed(text) {
    const ids = this.tokenize(text), n = ids.length, dims = [1, n];
    const columns = { input_ids: BigInt64Array.from(ids, BigInt),
                      attention_mask: new BigInt64Array(n).fill(1n),
                      token_type_ids: new BigInt64Array(n) };
    const feeds = {};
    for (const name of this.spec.inputs) feeds[name] = new this.ort.Tensor("int64", columns[name], dims);
    const out = await this.session.run(feeds);
    return pool(out.token_embeddings.data, n, this.spec.dim, this.spec.pooling);
  }
}

async function loadEmbedder(root, ix) {
  const [ort, wasm, model, tokenizer] = await Promise.all([
    import(root + ix.runtime.module),
    fetchInflated(root + ix.runtime.wasm),
    fetchParts(root, ix.model.parts, ix.model.bytes),
    fetchInflated(root + ix.tokenizer).then((b) => JSON.parse(new TextDecoder().decode(b))),
  ]);
  // The bundle carries its Emscripten glue and gets the binary here, so the runtime
  // fetches nothing itself (setting wasmPaths would make it import the glue file).
  ort.env.wasm.wasmBinary = wasm;
  ort.env.wasm.proxy = false;
  // Threads need SharedArrayBuffer, i.e. cross-origin isolation (COOP/COEP
  // headers) that static hosts like GitHub Pages do not send: one thread then.
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  return new Embedder(ort, session, new WordPiece(tokenizer), ix.embedder);
}

async function loadLabels(root, ix) {
  const [labels, vectors] = await Promise.all([
    fetchInflated(root + ix.labels).then((b) => JSON.parse(new TextDecoder().decode(b))),
    fetchParts(root, ix.vectors.parts, ix.vectors.bytes),
  ]);
  const vecs = toFloat32(vectors, ix.vectors.dtype);
  if (vecs.length !== labels.texts.length * ix.vectors.dim) throw new Error("vectors do not match the labels");
  return { labels, vecs, perLayer: neuronsPerLayer(labels) };
}

/** The semantic engine of a site: {search(query, k, scope), embedder, index, loadMs}.
 *  root: the site's root URL; indexPath: data/semantic/index.json. */
export async function load(root, indexPath) {
  const t0 = performance.now();
  const ix = await (await fetch(root + indexPath)).json();
  if (ix.format !== FORMAT) throw new Error(`semantic index format ${ix.format} is not ${FORMAT}`);
  const [embedder, { labels, vecs, perLayer }] = await Promise.all([loadEmbedder(root, ix), loadLabels(root, ix)]);
  const dim = ix.vectors.dim, loadMs = performance.now() - t0;

  /** scope: null (every layer) or a Set of layer paths. */
  async function search(query, k, scope) {
    const q = await embedder.embed(query.trim());
    const allowed = scope ? Uint8Array.from(labels.layers, (l) => (scope.has(l.path) ? 1 : 0)) : null;
    const top = rankNeurons(similarities(q, vecs, dim), labels, k, allowed);
    const total = perLayer.reduce((sum, n, i) => sum + (allowed && !allowed[i] ? 0 : n), 0);
    return {
      total,
      hits: top.map((h) => ({ path: labels.layers[h.layer].path, unit: h.unit, rank: h.rank,
                              label: labels.texts[h.text], score: h.sim, similarity: h.sim })),
    };
  }
  return { search, embedder, index: ix, loadMs };
}
