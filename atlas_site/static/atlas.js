// dnd-atlas site: helpers shared by the layer tables, the neuron page and search.
//
// Every string that comes from the atlas (labels, captions, concepts, model and
// layer names: model output and user input) reaches the page through
// textContent or setAttribute only, never as HTML. URLs are built from slugs
// ([A-Za-z0-9_.-]), unit numbers and image paths checked against a pattern.
// Data files live under data/ next to this site's pages; large ones are gzip
// files inflated here (DecompressionStream), so no server configuration is needed.
(function () {
  "use strict";

  var here = document.currentScript && document.currentScript.src;
  var ROOT = here ? here.replace(/assets\/atlas\.js(?:[?#].*)?$/, "") : "./";
  var SLUG = /^[A-Za-z0-9_.-]+$/;
  var IMAGE = /^images\/[A-Za-z0-9_.\/-]+$/;
  var cache = {};

  /** A DOM element; attrs: "text" sets textContent, "class" className, "on*" listeners,
   *  anything else setAttribute. Children: nodes or strings (made text nodes). */
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "text") node.textContent = String(v);
      else if (k === "class") node.className = v;
      else if (k.slice(0, 2) === "on" && typeof v === "function") node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, String(v));
    });
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function inflate(buffer) {
    var bytes = new Uint8Array(buffer);
    // A server may already have undone the gzip (Content-Encoding): then it is plain JSON.
    if (bytes.length < 2 || bytes[0] !== 0x1f || bytes[1] !== 0x8b) {
      return Promise.resolve(new TextDecoder().decode(bytes));
    }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text();
  }

  /** The parsed JSON of a data file (site-relative path), fetched once per page. */
  function loadJSON(path) {
    if (!cache[path]) {
      cache[path] = fetch(ROOT + path).then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status + " for " + path);
        return r.arrayBuffer();
      }).then(inflate).then(JSON.parse);
    }
    return cache[path];
  }

  function site() { return loadJSON("data/site.json"); }

  function layerOf(siteData, path) {
    for (var i = 0; i < siteData.layers.length; i++) {
      if (siteData.layers[i].path === path) return siteData.layers[i];
    }
    return null;
  }

  function okPath(path) {
    var parts = String(path).split("/");
    return parts.length === 2 && SLUG.test(parts[0]) && SLUG.test(parts[1]);
  }

  /** The stable URL of a neuron: neuron.html#<model slug>/<layer slug>/<unit>. */
  function neuronHref(path, unit) {
    return okPath(path) ? ROOT + "neuron.html#" + path + "/" + Number(unit) : null;
  }

  function layerHref(path) { return okPath(path) ? ROOT + "layers/" + path + ".html" : null; }

  function modelHref(slug) { return SLUG.test(slug) ? ROOT + "models/" + slug + ".html" : null; }

  /** {path, unit} from a fragment "#model/layer/unit" (parts may be percent-encoded). */
  function parseNeuronHash(hash) {
    var parts = String(hash || "").replace(/^#/, "").split("/").map(function (p) {
      try { return decodeURIComponent(p); } catch (e) { return ""; }
    });
    if (parts.length !== 3 || !/^\d+$/.test(parts[2])) return null;
    var path = parts[0] + "/" + parts[1];
    return okPath(path) ? { path: path, unit: parseInt(parts[2], 10) } : null;
  }

  function imageSrc(path) {
    return typeof path === "string" && IMAGE.test(path) && path.indexOf("..") < 0 ? ROOT + path : null;
  }

  /** An image in a frame, with the crop box drawn over it when ``box`` gives its
   *  fractions [x0, y0, x1, y1], and an optional heatmap laid over it. */
  function picture(path, opts) {
    opts = opts || {};
    var src = imageSrc(path);
    if (!src) return el("span", { "class": "atlas-muted atlas-noimage", text: "(no image)" });
    var frame = el("span", { "class": "atlas-frame " + (opts.cls || "") }, [
      el("img", { src: src, alt: opts.alt || "", loading: opts.eager ? null : "lazy", decoding: "async" })]);
    var box = opts.box;
    if (box && box.length === 4) {
      var pct = function (v) { return Math.max(0, Math.min(100, Number(v) * 100)).toFixed(2) + "%"; };
      var div = el("span", { "class": "atlas-box" });
      div.style.left = pct(box[0]);
      div.style.top = pct(box[1]);
      div.style.width = pct(box[2] - box[0]);
      div.style.height = pct(box[3] - box[1]);
      frame.appendChild(div);
    }
    var heat = imageSrc(opts.heatmap);
    if (heat) frame.appendChild(el("img", { "class": "atlas-heat", src: heat, alt: "", loading: "lazy" }));
    return frame;
  }

  /** A number for display ("-" when missing). */
  function fmt(v, digits) {
    if (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) return "-";
    if (Number.isInteger(v) && digits === 0) return String(v);
    return v.toFixed(digits === undefined ? 3 : digits);
  }

  function fail(node, message, err) {
    clear(node).appendChild(el("p", { "class": "atlas-error", text: message }));
    if (err && window.console) console.warn("dnd-atlas:", message, err);
  }

  var views = {};

  function start() {
    document.querySelectorAll("[data-atlas-view]").forEach(function (node) {
      var view = views[node.getAttribute("data-atlas-view")];
      if (view) view(node);
    });
    Object.keys(hooks).forEach(function (k) { hooks[k](); });
  }
  var hooks = {};

  window.Atlas = {
    ROOT: ROOT, el: el, clear: clear, loadJSON: loadJSON, site: site, layerOf: layerOf,
    neuronHref: neuronHref, layerHref: layerHref, modelHref: modelHref,
    parseNeuronHash: parseNeuronHash, imageSrc: imageSrc, picture: picture, fmt: fmt, fail: fail,
    // views[name](node) renders a [data-atlas-view=name] element; onStart[name]() runs on every page.
    views: views, onStart: hooks
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else setTimeout(start, 0);
})();
