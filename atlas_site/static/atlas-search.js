// dnd-atlas site: searching neurons by their labels, in the browser.
//
// Atlas.search holds search engines; Atlas.search.run(query, {k, filters})
// asks them in order of priority and falls back to the next one when an
// engine is not available or fails. The keyword engine (here) reads
// data/search.json.gz: the distinct label texts, each with its [layer, unit,
// rank, ...] references. The semantic engine (atlas-semantic.js) registers
// itself the same way:
//
//   Atlas.search.register({name: "semantic", priority: 10,
//     available: function () { return Promise.resolve(true); },
//     ready: function () { return loaded; },   // optional: false while a big download is due
//     prepare: function () { return promiseOfLoaded; },
//     search: function (query, k, scope) { return Promise.resolve({hits: [...], total: n}); }});
//
// scope is null or the Set of layer paths the filters allow (filters: {model,
// layer}, names as in `dnd-atlas search --model M --layer L`). With {wait:
// false}, run() skips an engine that is not ready yet, starts preparing it and
// returns res.pending, which resolves when it is ready (the UI then asks again).
// A hit is {path, unit, label, rank, score[, similarity]}; the UI adds names and links.
// The results show in a box in the site header (as you type) and on search.html#q=...
(function () {
  "use strict";
  var A = window.Atlas, el = A.el;
  var engines = [];

  function register(engine) {
    engines.push(engine);
    engines.sort(function (a, b) { return (b.priority || 0) - (a.priority || 0); });
  }

  /** The Set of layer paths that filters {model, layer} allow, or null for all. */
  function scopeOf(siteData, filters) {
    if (!filters || (!filters.model && !filters.layer)) return null;
    var out = new Set();
    siteData.layers.forEach(function (li) {
      if ((!filters.model || li.model === filters.model) && (!filters.layer || li.layer === filters.layer)) {
        out.add(li.path);
      }
    });
    return out;
  }

  function run(query, opts) {
    opts = opts || {};
    var k = opts.k || 50, i = 0, later = null;
    // An engine still to load starts loading once the fallback has answered: its
    // downloads would otherwise hold up the fallback's (a browser opens six
    // connections per host).
    function withPending(res) {
      if (later) {
        res.pending = Promise.resolve(later.prepare()).then(function () { return later.name; });
        res.pending.catch(function () {});  // the caller may not listen; a failure is logged
      }
      return res;
    }
    return A.site().then(function (siteData) {
      var scope = scopeOf(siteData, opts.filters);
      function next(lastErr) {
        if (i >= engines.length) {
          if (later) withPending({});
          return Promise.reject(lastErr || new Error("no search engine"));
        }
        var engine = engines[i++];
        var ready = engine.available ? engine.available() : Promise.resolve(true);
        return Promise.resolve(ready).then(function (ok) {
          if (!ok) return next(lastErr);
          if (opts.wait === false && engine.ready && !engine.ready()) {
            later = later || engine;
            return next(lastErr);
          }
          return engine.search(query, k, scope).then(function (res) {
            res.engine = engine.name;
            return withPending(res);
          });
        }).catch(function (err) {
          if (window.console) console.warn("dnd-atlas: search engine " + engine.name + " failed", err);
          return next(err);
        });
      }
      return next(null);
    });
  }

  // -- the keyword engine -----------------------------------------------------------

  var TOKEN = /[^\p{L}\p{N}]+/u;
  function tokens(s) { return String(s).toLowerCase().split(TOKEN).filter(Boolean); }

  var prepared = null;
  function index() {
    if (!prepared) {
      prepared = A.loadJSON("data/search.json.gz").then(function (ix) {
        ix.lower = ix.texts.map(function (t) { return t.toLowerCase(); });
        ix.tokens = ix.lower.map(tokens);
        return ix;
      });
    }
    return prepared;
  }

  /** How well a label text matches the query words: 0 = not at all. Each word must
   *  occur: as a whole word (best), as a word's prefix, or anywhere in the text. */
  function textScore(words, lower, toks, whole) {
    var total = 0;
    for (var w = 0; w < words.length; w++) {
      var word = words[w], best = 0;
      for (var t = 0; t < toks.length && best < 3; t++) {
        if (toks[t] === word) best = 3;
        else if (best < 2 && toks[t].lastIndexOf(word, 0) === 0) best = 2;
      }
      if (!best && lower.indexOf(word) >= 0) best = 1;
      if (!best) return 0;
      total += best;
    }
    var score = total / (3 * words.length);
    if (lower === whole) score += 1;
    return score - 0.01 * Math.max(0, toks.length - words.length);
  }

  function keywordSearch(query, k, scope) {
    var words = tokens(query), whole = words.join(" ");
    if (!words.length) return Promise.resolve({ hits: [], total: 0 });
    return index().then(function (ix) {
      var best = new Map();
      for (var i = 0; i < ix.texts.length; i++) {
        var s = textScore(words, ix.lower[i], ix.tokens[i], whole);
        if (s <= 0) continue;
        var refs = ix.refs[i];
        for (var r = 0; r + 2 < refs.length; r += 3) {
          if (scope && !scope.has(ix.layers[refs[r]])) continue;
          var id = refs[r] * 4294967296 + refs[r + 1], score = s - 0.05 * (refs[r + 2] - 1);
          var old = best.get(id);
          if (!old || old.score < score) {
            best.set(id, { layer: refs[r], unit: refs[r + 1], rank: refs[r + 2], label: ix.texts[i], score: score });
          }
        }
      }
      var hits = Array.from(best.values());
      hits.sort(function (a, b) { return b.score - a.score || a.layer - b.layer || a.unit - b.unit; });
      return {
        total: hits.length,
        hits: hits.slice(0, k).map(function (h) {
          return { path: ix.layers[h.layer], unit: h.unit, label: h.label, rank: h.rank, score: h.score };
        })
      };
    });
  }

  register({ name: "keyword", priority: 0, search: keywordSearch });

  // -- the UI: a box in the header and the search page ------------------------------

  function hitItem(hit, siteData) {
    var layer = A.layerOf(siteData, hit.path);
    var where = (layer ? layer.model + " / " + layer.layer : hit.path) + " / unit " + hit.unit;
    var extra = (hit.rank > 1 ? " (label " + hit.rank + ")" : "") +
      (typeof hit.similarity === "number" ? " · cosine " + hit.similarity.toFixed(3) : "");
    return el("li", { "class": "atlas-hit" }, [
      el("a", { "class": "atlas-hit-link", href: A.neuronHref(hit.path, hit.unit) }, [
        el("span", { "class": "atlas-hit-label", text: hit.label }),
        el("span", { "class": "atlas-muted atlas-hit-where", text: " " + where + extra })])]);
  }

  function megabytes(n) { return (n / 1e6).toFixed(1) + " MB"; }

  function summary(res) {
    if (res.total === 0) return "No neuron has a label with these words.";
    return (res.total > res.hits.length ? "Best " + res.hits.length + " of " : "") + res.total +
      " neuron(s) (" + res.engine + " search)";
  }

  /** Run a search into a result list; a later call on the same list wins. With an
   *  engine still loading, the keyword results show first, then the better ones. */
  function show(list, status, query, k, filters) {
    var token = (list.atlasToken = (list.atlasToken || 0) + 1);
    var current = function () { return list.atlasToken === token; };
    if (!query.trim()) { A.clear(list); status.textContent = ""; return Promise.resolve(); }
    status.textContent = "Searching…";
    return Promise.all([A.site(), run(query, { k: k, filters: filters, wait: false })]).then(function (both) {
      var siteData = both[0], res = both[1];
      if (!current()) return null;
      A.clear(list);
      res.hits.forEach(function (h) { list.appendChild(hitItem(h, siteData)); });
      status.textContent = summary(res);
      list.setAttribute("data-engine", res.engine);  // for tests and styles: who answered what
      list.setAttribute("data-query", query);
      list.setAttribute("data-model", (filters && filters.model) || "");  // the filters it answered
      list.setAttribute("data-layer", (filters && filters.layer) || "");
      if (!res.pending) return null;
      var loading = engines.filter(function (e) { return e.ready && !e.ready(); })[0];
      Promise.resolve(loading && loading.size ? loading.size() : 0).then(function (bytes) {
        if (current()) status.textContent += "; loading semantic search" + (bytes ? " (" + megabytes(bytes) + ", once)" : "") + "…";
      });
      return res.pending.then(function () {
        return current() ? show(list, status, query, k, filters) : null;
      }, function () {
        if (current()) status.textContent = summary(res) + "; semantic search could not load.";
      });
    }).catch(function (err) {
      if (!current()) return;
      A.clear(list);
      status.textContent = "Search is not available on this page.";
      if (window.console) console.warn("dnd-atlas: search failed", err);
    });
  }

  function searchPageHref(query) { return A.ROOT + "search.html#q=" + encodeURIComponent(query); }

  function headerBox() {
    var bar = document.querySelector(".md-header__inner");
    if (!bar || bar.querySelector(".atlas-header-search")) return;
    var input = el("input", { type: "search", "class": "atlas-header-input", placeholder: "Search neurons",
      "aria-label": "Search neurons by label words", autocomplete: "off" });
    var status = el("div", { "class": "atlas-suggest-status atlas-muted" });
    var list = el("ol", { "class": "atlas-suggest-list" });
    var panel = el("div", { "class": "atlas-suggest", hidden: "" }, [status, list]);
    var form = el("form", { "class": "atlas-header-search", role: "search" }, [input, panel]);
    var timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        panel.hidden = !input.value.trim();
        show(list, status, input.value, 8);
      }, 150);
    });
    input.addEventListener("keydown", function (e) { if (e.key === "Escape") panel.hidden = true; });
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      if (input.value.trim()) location.href = searchPageHref(input.value.trim());
    });
    document.addEventListener("click", function (e) { if (!form.contains(e.target)) panel.hidden = true; });
    var source = bar.querySelector(".md-header__source");
    bar.insertBefore(form, source);
  }

  /** The model and layer filters of the search page, filled from site.json. */
  function filterControls(node, siteData, onChange) {
    var model = node.querySelector(".atlas-search-model"), layer = node.querySelector(".atlas-search-layer");
    if (!model || !layer) return { get: function () { return {}; }, set: function () {} };
    function options(select, values, all) {
      var keep = select.value;
      A.clear(select).appendChild(el("option", { value: "", text: all }));
      values.forEach(function (v) { select.appendChild(el("option", { value: v, text: v })); });
      select.value = values.indexOf(keep) >= 0 ? keep : "";
    }
    function layers() {
      var names = [];
      siteData.layers.forEach(function (li) {
        if ((!model.value || li.model === model.value) && names.indexOf(li.layer) < 0) names.push(li.layer);
      });
      options(layer, names, "All layers");
    }
    options(model, siteData.models.map(function (m) { return m.name; }), "All models");
    layers();
    model.addEventListener("change", function () { layers(); onChange(); });
    layer.addEventListener("change", onChange);
    return {
      get: function () { return { model: model.value || null, layer: layer.value || null }; },
      set: function (f) { model.value = f.model || ""; layers(); layer.value = f.layer || ""; }
    };
  }

  A.views.search = function (node) {
    var form = node.querySelector(".atlas-search-form"), input = node.querySelector(".atlas-search-input");
    var status = node.querySelector(".atlas-search-status"), list = node.querySelector(".atlas-search-results");
    A.site().then(function (siteData) {
      var filters = filterControls(node, siteData, submit);
      function toHash() {
        var p = new URLSearchParams(), f = filters.get();
        p.set("q", input.value.trim());
        if (f.model) p.set("model", f.model);
        if (f.layer) p.set("layer", f.layer);
        history.replaceState(null, "", "#" + p.toString());
      }
      function submit() {
        toHash();
        show(list, status, input.value, 200, filters.get());
      }
      function fromHash() {
        var p = new URLSearchParams(location.hash.replace(/^#/, ""));
        input.value = p.get("q") || "";
        filters.set({ model: p.get("model"), layer: p.get("layer") });
        show(list, status, input.value, 200, filters.get());
      }
      form.addEventListener("submit", function (e) { e.preventDefault(); submit(); });
      window.addEventListener("hashchange", fromHash);
      fromHash();
    }).catch(function (err) { A.fail(node, "Search is not available on this page.", err); });
  };

  A.onStart.searchBox = headerBox;
  A.search = { register: register, run: run, engines: engines, keyword: keywordSearch, tokens: tokens,
                scope: scopeOf };
})();
