// dnd-atlas site: the semantic search engine (Atlas.search, priority 10).
//
// Ranks neurons by the cosine of their labels to the query, in the browser,
// as `dnd-atlas search` does: the atlas's ONNX embedder runs in onnxruntime-web
// (WebAssembly) inside a module worker (semantic/worker.mjs), every file from
// the site's own origin. Available when the site was built with it (site.json
// names data/semantic/index.json and its size) and the browser has module
// workers and WebAssembly; nothing large is fetched until the first search.
// While it loads, and whenever it cannot load, keyword search answers.
(function () {
  "use strict";
  var A = window.Atlas;
  var loading = null, engine = null, failed = null;

  function info() { return A.site().then(function (s) { return s.semantic || null; }); }

  function supported() {
    return typeof WebAssembly === "object" && typeof Worker === "function" &&
      typeof DecompressionStream === "function" && typeof BigInt64Array === "function";
  }

  function available() {
    return info().then(function (s) { return !!s && !failed && supported(); });
  }

  /** A promise-returning call(op, args) over a module worker. */
  function connect(url) {
    var worker = new Worker(url, { type: "module" }), calls = {}, next = 0;
    function fail(message) {
      Object.keys(calls).forEach(function (id) { calls[id].reject(new Error(message)); });
      calls = {};
    }
    worker.onmessage = function (e) {
      var call = calls[e.data.id];
      if (!call) return;
      delete calls[e.data.id];
      if (e.data.error) call.reject(new Error(e.data.error));
      else call.resolve(e.data.value);
    };
    worker.onerror = function (e) { fail("the semantic search worker failed: " + (e.message || "error")); };
    return function call(op, args) {
      return new Promise(function (resolve, reject) {
        var id = ++next;
        calls[id] = { resolve: resolve, reject: reject };
        worker.postMessage(Object.assign({ id: id, op: op }, args || {}));
      });
    };
  }

  /** Start loading (once); resolves with the engine when it can answer. */
  function prepare() {
    if (!loading) {
      loading = info().then(function (s) {
        var call = connect(A.ROOT + "assets/semantic/worker.mjs");
        return call("load", { root: A.ROOT, index: s.index }).then(function (loaded) {
          return {
            loadMs: loaded.loadMs,
            search: function (query, k, scope) {
              return call("search", { query: query, k: k, scope: scope ? Array.from(scope) : null });
            },
            tokenize: function (texts) { return call("tokenize", { texts: texts }); }
          };
        });
      }).then(function (e) {
        engine = e;
        return e;
      }, function (err) {
        failed = err;
        if (window.console) console.warn("dnd-atlas: semantic search could not load", err);
        throw err;
      });
    }
    return loading;
  }

  A.search.register({
    name: "semantic", priority: 10, available: available, prepare: prepare,
    ready: function () { return !!engine; },
    search: function (query, k, scope) {
      return prepare().then(function (e) { return e.search(query, k, scope); });
    },
    // the bytes the first search loads (for the status line)
    size: function () { return info().then(function (s) { return s ? s.bytes : 0; }); }
  });
})();
