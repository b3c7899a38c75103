// dnd-atlas site: ranking neurons by the cosine of their labels to a query,
// by the rules of query/ranking.py (what `dnd-atlas search` does):
//   - one vector per distinct label text: copies of a text tie;
//   - a neuron scores its best label (the lower rank between two equal ones);
//   - similarity descending, then model, layer, unit ascending: `layers` come
//     in Python's (model, layer) order, so their index is the tie order.
// data: {layers: [{path, model, layer}], texts: [...], refs: [[layer, unit, rank, ...], ...]}
// (refs[i]: the labels that read texts[i]); vectors: Float32Array, texts x dim.

/** Cosines of every text to the unit vector q (accumulated in double precision). */
export function similarities(q, vectors, dim) {
  const n = vectors.length / dim, out = new Float64Array(n);
  for (let t = 0, o = 0; t < n; t++, o += dim) {
    let s = 0;
    for (let j = 0; j < dim; j++) s += q[j] * vectors[o + j];
    out[t] = s;
  }
  return out;
}

/** The k best neurons: [{layer, unit, rank, text, sim}] (layer: an index into data.layers).
 *  allowed: null, or a Uint8Array over layers (1 = in the search's scope). */
export function rankNeurons(sims, data, k, allowed) {
  const order = Array.from(sims.keys()).sort((a, b) => sims[b] - sims[a] || a - b);
  const best = new Map(), found = [];
  for (const t of order) {
    const s = sims[t];
    // Texts come best first, so neurons are found best first: past the k-th
    // neuron's similarity nothing can enter (an equal one still can, by key).
    if (found.length >= k && s < found[k - 1].sim) break;
    const refs = data.refs[t];
    for (let r = 0; r + 2 < refs.length; r += 3) {
      const layer = refs[r], unit = refs[r + 1], rank = refs[r + 2];
      if (allowed && !allowed[layer]) continue;
      const id = layer * 4294967296 + unit, old = best.get(id);
      if (!old) {
        const hit = { layer, unit, rank, text: t, sim: s };
        best.set(id, hit);
        found.push(hit);
      } else if (old.sim === s && rank < old.rank) {
        old.rank = rank;
        old.text = t;
      }
    }
  }
  found.sort((a, b) => b.sim - a.sim || a.layer - b.layer || a.unit - b.unit);
  return found.slice(0, k);
}

/** How many neurons each layer has in the ranking (labelled neurons with status ok). */
export function neuronsPerLayer(data) {
  const seen = data.layers.map(() => new Set());
  for (const refs of data.refs) {
    for (let r = 0; r + 2 < refs.length; r += 3) seen[refs[r]].add(refs[r + 1]);
  }
  return seen.map((s) => s.size);
}
