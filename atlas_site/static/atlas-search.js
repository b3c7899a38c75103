// dnd-atlas site: searching neurons by their labels, in the browser.
//
// Atlas.search holds search engines; Atlas.search.run(query, {k}) asks them in
// order of priority and falls back to the next one when an engine is not
// available or fails. The keyword engine (here) reads data/search.json.gz: the
// distinct label texts, each with its [layer, unit, rank, ...] references. A
// semantic engine can be added by another script:
//
//   Atlas.search.register({name: "semantic", priority: 10,
//     available: function () { return Promise.resolve(true); },
//     search: function (query, k) { return Promise.resolve({hits: [...], total: n}); }});
//
// A hit is {path, unit, label, rank, score}; the UI adds names and links.
// The results show in a box in the site header (as you type) and on search.html#q=...
(function () {
  "use strict";
  var A = window.Atlas, el = A.el;
  var engines = [];

  function register(engine) {
    engines.push(engine);
    engines.sort(function (a, b) { return (b.priority || 0) - (a.priority || 0); });
  }

  function run(query, opts) {
    var k = (opts && opts.k) || 50, i = 0;
    function next(lastErr) {
      if (i >= engines.length) return Promise.reject(lastErr || new Error("no search engine"));
      var engine = engines[i++];
      var ready = engine.available ? engine.available() : Promise.resolve(true);
      return Promise.resolve(ready).then(function (ok) {
        if (!ok) return next(lastErr);
        return engine.search(query, k).then(function (res) {
          res.engine = engine.name;
          return res;
        });
      }).catch(function (err) {
        if (window.console) console.warn("dnd-atlas: search engine " + engine.name + " failed", err);
        return next(err);
      });
    }
    return next(null);
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

  function keywordSearch(query, k) {
    var words = tokens(query), whole = words.join(" ");
    if (!words.length) return Promise.resolve({ hits: [], total: 0 });
    return index().then(function (ix) {
      var best = new Map();
      for (var i = 0; i < ix.texts.length; i++) {
        var s = textScore(words, ix.lower[i], ix.tokens[i], whole);
        if (s <= 0) continue;
        var refs = ix.refs[i];
        for (var r = 0; r + 2 < refs.length; r += 3) {
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
    return el("li", { "class": "atlas-hit" }, [
      el("a", { "class": "atlas-hit-link", href: A.neuronHref(hit.path, hit.unit) }, [
        el("span", { "class": "atlas-hit-label", text: hit.label }),
        el("span", { "class": "atlas-muted atlas-hit-where", text: " " + where +
          (hit.rank > 1 ? " (label " + hit.rank + ")" : "") })])]);
  }

  function show(list, status, query, k) {
    if (!query.trim()) { A.clear(list); status.textContent = ""; return Promise.resolve(); }
    status.textContent = "Searching…";
    return Promise.all([A.site(), run(query, { k: k })]).then(function (both) {
      var siteData = both[0], res = both[1];
      A.clear(list);
      res.hits.forEach(function (h) { list.appendChild(hitItem(h, siteData)); });
      status.textContent = res.total === 0 ? "No neuron has a label with these words." :
        (res.total > res.hits.length ? "Best " + res.hits.length + " of " : "") + res.total +
        " neuron(s) (" + res.engine + " search)";
    }).catch(function (err) {
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

  A.views.search = function (node) {
    var form = node.querySelector(".atlas-search-form"), input = node.querySelector(".atlas-search-input");
    var status = node.querySelector(".atlas-search-status"), list = node.querySelector(".atlas-search-results");
    function fromHash() {
      var q = new URLSearchParams(location.hash.replace(/^#/, "")).get("q") || "";
      input.value = q;
      show(list, status, q, 200);
    }
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      history.replaceState(null, "", "#q=" + encodeURIComponent(input.value.trim()));
      show(list, status, input.value, 200);
    });
    window.addEventListener("hashchange", fromHash);
    fromHash();
  };

  A.onStart.searchBox = headerBox;
  A.search = { register: register, run: run, engines: engines, keyword: keywordSearch, tokens: tokens };
})();
