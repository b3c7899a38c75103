// dnd-atlas site: a BERT WordPiece tokenizer that reads a Hugging Face
// tokenizer.json (BertNormalizer, BertPreTokenizer, WordPiece, Template / Bert /
// Roberta post-processing): enough for the MiniLM and MPNet sentence embedders,
// and the same token ids as the Python `tokenizers` library (a browser test
// compares them on 200 varied texts). Other tokenizers are refused when the
// site is built, so the page never meets one.

const CJK = [[0x4e00, 0x9fff], [0x3400, 0x4dbf], [0x20000, 0x2a6df], [0x2a700, 0x2b73f],
  [0x2b740, 0x2b81f], [0x2b820, 0x2ceaf], [0xf900, 0xfaff], [0x2f800, 0x2fa1f]];
const isCjk = (cp) => CJK.some(([lo, hi]) => cp >= lo && cp <= hi);
const OTHER = /\p{C}/u; // control, format, surrogate, private use, unassigned
const ZS = /\p{Zs}/u;
const WHITE = /\s/u;
const PUNCT = /[\p{P}!-\/:-@\[-`{-~]/u; // Unicode punctuation or any ASCII punctuation/symbol
const MARK = /\p{Mn}/gu;

function normalize(text, cfg) {
  let out = "";
  for (const ch of text) {
    const cp = ch.codePointAt(0);
    if (cfg.clean_text !== false) {
      if (cp === 0 || cp === 0xfffd) continue;
      if (ch === "\t" || ch === "\n" || ch === "\r" || ZS.test(ch)) { out += " "; continue; }
      if (OTHER.test(ch)) continue;
    }
    out += cfg.handle_chinese_chars !== false && isCjk(cp) ? ` ${ch} ` : ch;
  }
  const strip = cfg.strip_accents ?? cfg.lowercase; // null follows lowercase, as in BERT
  if (strip) out = out.normalize("NFD").replace(MARK, "");
  if (cfg.lowercase) out = out.toLowerCase();
  return out;
}

function preTokenize(text) {
  const words = [];
  let cur = "";
  for (const ch of text) {
    if (WHITE.test(ch)) { if (cur) words.push(cur); cur = ""; }
    else if (PUNCT.test(ch)) { if (cur) words.push(cur); words.push(ch); cur = ""; }
    else cur += ch;
  }
  if (cur) words.push(cur);
  return words;
}

export class WordPiece {
  /** spec: the parsed tokenizer.json. */
  constructor(spec) {
    const m = spec.model || {};
    if (m.type !== "WordPiece") throw new Error(`not a WordPiece tokenizer: ${m.type}`);
    this.vocab = new Map(Object.entries(m.vocab));
    for (const t of spec.added_tokens || []) this.vocab.set(t.content, t.id);
    this.unk = this.vocab.get(m.unk_token);
    this.prefix = m.continuing_subword_prefix ?? "##";
    this.maxChars = m.max_input_chars_per_word ?? 100;
    this.norm = spec.normalizer || {};
    const pp = spec.post_processor || {};
    if (pp.type === "TemplateProcessing") {
      const ids = (p) => (p.SpecialToken ? this.vocab.get(p.SpecialToken.id) : null);
      const i = pp.single.findIndex((p) => p.Sequence);
      this.before = pp.single.slice(0, i).map(ids);
      this.after = pp.single.slice(i + 1).map(ids);
    } else if (pp.type === "BertProcessing" || pp.type === "RobertaProcessing") {
      this.before = [pp.cls[1]];
      this.after = [pp.sep[1]];
    } else throw new Error(`unsupported post-processor ${pp.type}`);
  }

  wordIds(word) {
    const chars = Array.from(word);
    if (chars.length > this.maxChars) return [this.unk];
    const ids = [];
    for (let start = 0; start < chars.length;) {
      let end = chars.length, id;
      for (; end > start; end--) {
        const piece = (start > 0 ? this.prefix : "") + chars.slice(start, end).join("");
        if ((id = this.vocab.get(piece)) !== undefined) break;
      }
      if (end === start) return [this.unk]; // no piece fits: the whole word is unknown
      ids.push(id);
      start = end;
    }
    return ids;
  }

  /** Token ids with special tokens, truncated to maxLength (special tokens included). */
  encode(text, maxLength) {
    let ids = preTokenize(normalize(text, this.norm)).flatMap((w) => this.wordIds(w));
    const room = maxLength - this.before.length - this.after.length;
    if (ids.length > room) ids = ids.slice(0, room);
    return [...this.before, ...ids, ...this.after];
  }
}
