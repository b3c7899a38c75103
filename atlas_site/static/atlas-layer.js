// dnd-atlas site: the layer table, rendered from data/<model>/<layer>/index.json.gz.
//
// Columns come from the data file ({key, title, kind}), so a new per-label number
// needs no change here: every "num"/"int" column sorts and gets a minimum filter.
// Only one page of rows is in the DOM at a time, so 50,000-row layers stay fast.
// The table's state (sort, filter, page) is kept in the URL fragment, e.g.
// layers/m/l.html#sort=-score&q=dog&min.score=0.5&page=2, so a view can be shared.
(function () {
  "use strict";
  var A = window.Atlas, el = A.el;
  var PAGE_SIZES = [50, 100, 250, 1000];

  function readState() {
    var state = { sort: null, desc: false, q: "", mins: {}, page: 1, size: 100 };
    new URLSearchParams(location.hash.replace(/^#/, "")).forEach(function (v, k) {
      if (k === "sort") { state.desc = v.charAt(0) === "-"; state.sort = v.replace(/^-/, ""); }
      else if (k === "q") state.q = v;
      else if (k === "page") state.page = Math.max(1, parseInt(v, 10) || 1);
      else if (k === "size") state.size = PAGE_SIZES.indexOf(+v) >= 0 ? +v : 100;
      else if (k.slice(0, 4) === "min.") state.mins[k.slice(4)] = v;
    });
    return state;
  }

  function writeState(state) {
    var p = new URLSearchParams();
    if (state.sort) p.set("sort", (state.desc ? "-" : "") + state.sort);
    if (state.q) p.set("q", state.q);
    Object.keys(state.mins).forEach(function (k) { if (state.mins[k] !== "") p.set("min." + k, state.mins[k]); });
    if (state.page > 1) p.set("page", String(state.page));
    if (state.size !== 100) p.set("size", String(state.size));
    var hash = p.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  function Table(node, data) {
    this.node = node;
    this.data = data;
    this.columns = data.columns;
    this.n = data.values.unit.length;
    this.state = readState();
    this.build();
    this.update(false);
  }

  Table.prototype.numeric = function (col) { return col.kind === "num" || col.kind === "int"; };

  Table.prototype.build = function () {
    var self = this, st = this.state;
    var filter = el("input", { type: "search", "class": "atlas-filter", placeholder: "words in labels",
      value: st.q, "aria-label": "Filter by words in labels" });
    filter.addEventListener("input", debounce(function () {
      st.q = filter.value; st.page = 1; self.update(true);
    }, 120));
    var controls = [el("label", {}, ["Filter labels ", filter])];
    this.columns.forEach(function (col) {
      if (col.kind !== "num") return;
      var input = el("input", { type: "number", step: "any", "class": "atlas-min", "data-key": col.key,
        value: st.mins[col.key] || "", "aria-label": "Minimum " + col.title });
      input.addEventListener("input", debounce(function () {
        st.mins[col.key] = input.value; st.page = 1; self.update(true);
      }, 120));
      controls.push(el("label", {}, ["Min. " + col.title + " ", input]));
    });
    this.count = el("span", { "class": "atlas-count", "aria-live": "polite" });
    controls.push(this.count);
    var head = el("tr");
    this.ths = this.columns.map(function (col) {
      var th = el("th", { "data-key": col.key, scope: "col", text: col.title });
      if (col.kind !== "image") {
        th.setAttribute("data-sort", self.numeric(col) ? "num" : "text");
        th.tabIndex = 0;
        var go = function () { self.sortBy(col.key); };
        th.addEventListener("click", go);
        th.addEventListener("keydown", function (e) {
          if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); }
        });
      }
      head.appendChild(th);
      return th;
    });
    this.body = el("tbody");
    this.pager = el("div", { "class": "atlas-pager" });
    A.clear(this.node);
    this.node.appendChild(el("div", { "class": "atlas-controls" }, controls));
    this.node.appendChild(el("div", { "class": "atlas-scroll" }, [
      el("table", { id: "units", "data-sortable": "" }, [el("thead", {}, [head]), this.body])]));
    this.node.appendChild(this.pager);
  };

  Table.prototype.sortBy = function (key) {
    var st = this.state;
    if (st.sort === key) st.desc = !st.desc;
    else { st.sort = key; st.desc = false; }
    st.page = 1;
    this.update(true);
  };

  /** Row indices passing the filters, in the current sort order. */
  Table.prototype.rows = function () {
    var st = this.state, vals = this.data.values, text = this.data.text;
    var words = st.q.toLowerCase().split(/\s+/).filter(Boolean);
    var mins = Object.keys(st.mins).filter(function (k) {
      return st.mins[k] !== "" && !isNaN(parseFloat(st.mins[k])) && vals[k];
    }).map(function (k) { return [vals[k], parseFloat(st.mins[k])]; });
    var out = [];
    for (var i = 0; i < this.n; i++) {
      var ok = true, hay = text[i];
      for (var w = 0; ok && w < words.length; w++) ok = hay.indexOf(words[w]) !== -1;
      for (var m = 0; ok && m < mins.length; m++) {
        var v = mins[m][0][i];
        ok = v !== null && v >= mins[m][1];
      }
      if (ok) out.push(i);
    }
    var col = this.columns.filter(function (c) { return c.key === st.sort; })[0];
    if (col && col.kind !== "image") {
      var values = vals[col.key], sign = st.desc ? -1 : 1, num = this.numeric(col);
      var key = num ? values : values.map(function (v) { return v === null ? null : String(v).toLowerCase(); });
      out.sort(function (a, b) {
        var x = key[a], y = key[b];
        if (x === null || y === null) return x === y ? a - b : (x === null ? 1 : -1); // missing last
        return x < y ? -sign : x > y ? sign : a - b;
      });
    }
    return out;
  };

  Table.prototype.cell = function (col, i) {
    var v = this.data.values[col.key][i], td = el("td");
    if (col.kind === "image") {
      if (v) td.appendChild(typeof v === "string"
        ? A.picture(v, { cls: "atlas-thumb" }) : A.picture(v.src, { cls: "atlas-thumb", box: v.box }));
    } else if (col.kind === "label" || col.key === "unit") {
      var href = A.neuronHref(this.data.path, this.data.values.unit[i]);
      td.appendChild(el("a", { href: href, text: col.kind === "int" ? String(v) : (v || "") }));
    } else if (this.numeric(col)) {
      td.textContent = col.kind === "int" ? (v === null ? "-" : String(v)) : A.fmt(v);
    } else {
      td.textContent = v === null || v === undefined ? "" : String(v);
    }
    return td;
  };

  Table.prototype.update = function (save) {
    var self = this, st = this.state, rows = this.rows();
    var pages = Math.max(1, Math.ceil(rows.length / st.size));
    st.page = Math.min(st.page, pages);
    var start = (st.page - 1) * st.size, frag = document.createDocumentFragment();
    rows.slice(start, start + st.size).forEach(function (i) {
      var tr = el("tr", { "data-unit": self.data.values.unit[i] });
      self.columns.forEach(function (col) { tr.appendChild(self.cell(col, i)); });
      frag.appendChild(tr);
    });
    A.clear(this.body).appendChild(frag);
    this.ths.forEach(function (th) {
      if (th.getAttribute("data-key") === st.sort) th.setAttribute("aria-sort", st.desc ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
    this.count.textContent = rows.length + " of " + this.n + " neurons";
    this.renderPager(pages);
    if (save) writeState(st);
  };

  Table.prototype.renderPager = function (pages) {
    var self = this, st = this.state;
    var go = function (p) { return function () { st.page = p; self.update(true); }; };
    var size = el("select", { "class": "atlas-page-size", "aria-label": "Rows per page" },
      PAGE_SIZES.map(function (n) { return el("option", { value: n, text: n + " rows", selected: n === st.size ? "" : null }); }));
    size.addEventListener("change", function () { st.size = +size.value; st.page = 1; self.update(true); });
    A.clear(this.pager).appendChild(el("div", {}, [
      el("button", { type: "button", "class": "atlas-prev", disabled: st.page <= 1 ? "" : null, onclick: go(st.page - 1), text: "‹ Previous" }),
      el("span", { "class": "atlas-page", text: " page " + st.page + " of " + pages + " " }),
      el("button", { type: "button", "class": "atlas-next", disabled: st.page >= pages ? "" : null, onclick: go(st.page + 1), text: "Next ›" }),
      " ", size]));
  };

  function debounce(fn, ms) {
    var t = null;
    return function () { clearTimeout(t); t = setTimeout(fn, ms); };
  }

  A.views.layer = function (node) {
    var path = node.getAttribute("data-layer") || "";
    if (!A.layerHref(path)) return A.fail(node, "This page names no valid layer.");
    A.loadJSON("data/" + path + "/index.json.gz").then(function (data) {
      node.atlasTable = new Table(node, data);
    }).catch(function (err) { A.fail(node, "The table could not be loaded.", err); });
  };
})();
