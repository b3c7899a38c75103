// dnd-atlas site: the neuron page, neuron.html#<model slug>/<layer slug>/<unit>.
//
// Loads data/site.json and the one chunk file holding the unit
// (data/<model>/<layer>/n/<unit div chunk>.json.gz) and renders its labels,
// evidence (crop boxes drawn over plain thumbnails when the record gives them,
// activation heatmaps with a toggle), candidate concepts, calls and similar
// neurons. A change of the fragment (a similar-neuron link) re-renders in place.
(function () {
  "use strict";
  var A = window.Atlas, el = A.el;

  function table(head, rows) {
    return el("table", {}, [
      el("thead", {}, [el("tr", {}, head.map(function (h) { return el("th", { text: h }); }))]),
      el("tbody", {}, rows.map(function (r) {
        return el("tr", {}, r.map(function (c) {
          return typeof c === "string" ? el("td", { text: c }) : el("td", {}, [c]);
        }));
      }))]);
  }

  function extraNumbers(label) {
    return Object.keys(label).filter(function (k) {
      return k !== "rank" && k !== "text" && k !== "concept_score" && typeof label[k] === "number";
    });
  }

  function labels(rec) {
    if (!rec.labels.length) return null;
    var items = rec.labels.map(function (lb) {
      var extra = extraNumbers(lb).map(function (k) { return k.replace(/_/g, " ") + " " + A.fmt(lb[k]); });
      return el("li", { "class": "atlas-label" }, [
        el("strong", { text: lb.text }),
        el("span", { "class": "atlas-muted", text: " concept score " + A.fmt(lb.concept_score) +
          (extra.length ? " · " + extra.join(" · ") : "") })]);
    });
    return el("div", {}, [el("h2", { text: "Labels" }), el("ol", { "class": "atlas-labels" }, items)]);
  }

  function evidence(rec) {
    if (!rec.evidence.length) return null;
    var grid = el("div", { "class": "atlas-grid" });
    var hasHeat = false;
    rec.evidence.forEach(function (ev) {
      if (ev.heatmap) hasHeat = true;
      var where = ev.box ? "crop " + ev.box.map(function (v) { return Math.round(v); }).join(",") : "whole image";
      grid.appendChild(el("figure", { "class": "atlas-evidence-item" }, [
        A.picture(ev.image, { cls: "atlas-evidence", box: ev.frame, heatmap: ev.heatmap, alt: ev.caption || "" }),
        el("figcaption", {}, [
          "#" + ev.rank + " · activation " + A.fmt(ev.activation) + " · " + where,
          el("br"), el("span", { "class": "atlas-caption", text: ev.caption || "" }),
          el("br"), el("span", { "class": "atlas-muted atlas-source", text: ev.source || "" })])]));
    });
    var out = el("div", {}, [el("h2", { text: "Top images" })]);
    if (hasHeat) {
      var toggle = el("input", { type: "checkbox", "class": "atlas-heat-toggle" });
      var opacity = el("input", { type: "range", min: "0.1", max: "1", step: "0.05", value: "0.6",
        "class": "atlas-heat-opacity", "aria-label": "Heatmap opacity" });
      toggle.addEventListener("change", function () { grid.classList.toggle("atlas-show-heat", toggle.checked); });
      opacity.addEventListener("input", function () { grid.style.setProperty("--atlas-heat-opacity", opacity.value); });
      out.appendChild(el("p", { "class": "atlas-heat-controls" }, [
        el("label", {}, [toggle, " Show activation heatmaps"]), " · ", el("label", {}, ["opacity ", opacity])]));
    }
    out.appendChild(grid);
    return out;
  }

  function candidates(rec) {
    if (!rec.candidates.length) return null;
    var rows = rec.candidates.map(function (c) {
      var samples = el("span", { "class": "atlas-samples" }, c.samples.map(function (s) {
        return A.picture(s, { cls: "atlas-sample", alt: c.concept });
      }));
      return [String(c.position), c.concept, A.fmt(c.topk_squared), A.fmt(c.image_products),
        A.fmt(c.score), c.selected_rank === null ? "-" : String(c.selected_rank), samples];
    });
    return el("div", {}, [el("h2", { text: "Candidate concepts" }), table(
      ["#", "Concept", "TopK-Squared", "Image-Products", "Score", "Label", "Generated samples"], rows)]);
  }

  function calls(rec) {
    if (!rec.calls.length) return null;
    return el("div", {}, [el("h2", { text: "Calls per stage" }), table(["Stage", "Calls", "Cached"],
      rec.calls.map(function (c) { return [String(c[0]), String(c[1]), String(c[2])]; }))]);
  }

  function similar(rec, siteData) {
    if (!rec.similar.length) return null;
    return el("div", { "class": "atlas-similar" }, [el("h2", { text: "Similar neurons" }),
      el("ul", {}, rec.similar.map(function (nb) {
        var li = A.layerOf(siteData, nb.path);
        var name = li ? li.model + " / " + li.layer : nb.path;
        return el("li", {}, [
          el("a", { "class": "atlas-similar-link", href: A.neuronHref(nb.path, nb.unit), text: name + " / unit " + nb.unit }),
          ": " + nb.label + " ",
          el("span", { "class": "atlas-muted", text: "cosine " + A.fmt(nb.similarity) })]);
      }))]);
  }

  function render(node, siteData, layer, rec) {
    var title = layer.model + " / " + layer.layer + " / unit " + rec.unit;
    var h1 = document.getElementById("atlas-neuron-title");
    if (h1) h1.textContent = title;
    document.title = title + (rec.labels.length ? ": " + rec.labels.map(function (l) { return l.text; }).join(" · ") : "") +
      " - " + siteData.name;
    var model = siteData.models.filter(function (m) { return m.name === layer.model; })[0];
    var facts = [["Status", rec.status], ["Interpretability score", A.fmt(rec.interpretability)],
      ["Max activation", A.fmt(rec.max_activation)]];
    if (rec.reason) facts.push(["Reason", rec.reason]);
    var parts = [
      el("p", { "class": "atlas-crumbs" }, [
        el("a", { href: A.ROOT + "index.html", text: "Home" }), " › ",
        el("a", { href: model ? A.modelHref(model.slug) : null, text: layer.model }), " › ",
        el("a", { href: A.layerHref(layer.path), text: layer.layer }), " › unit " + rec.unit]),
      el("table", {}, [el("tbody", {}, facts.map(function (f) {
        return el("tr", {}, [el("th", { text: f[0] }), el("td", { text: f[1] })]);
      }))]),
      labels(rec), evidence(rec), candidates(rec), calls(rec), similar(rec, siteData)];
    A.clear(node);
    parts.forEach(function (p) { if (p) node.appendChild(p); });
    node.setAttribute("data-unit", String(rec.unit));
    node.setAttribute("data-layer", layer.path);
  }

  function show(node) {
    var key = A.parseNeuronHash(location.hash);
    if (!key) return A.fail(node, "No neuron in this address: open neuron.html#MODEL/LAYER/UNIT, " +
      "e.g. from a layer table or a search result.");
    A.site().then(function (siteData) {
      var layer = A.layerOf(siteData, key.path);
      if (!layer) return A.fail(node, "There is no layer " + key.path + " in this atlas.");
      var chunk = Math.floor(key.unit / siteData.chunk);
      if ((layer.chunks || []).indexOf(chunk) < 0) return A.fail(node, "Unit " + key.unit + " of " + layer.model + " / " + layer.layer + " is not in this atlas.");
      return A.loadJSON("data/" + key.path + "/n/" + chunk + ".json.gz").then(function (data) {
        var rec = data.units[String(key.unit)];
        if (!rec) return A.fail(node, "Unit " + key.unit + " of " + layer.model + " / " + layer.layer + " is not in this atlas.");
        render(node, siteData, layer, rec);
        window.scrollTo(0, 0);
      });
    }).catch(function (err) { A.fail(node, "The neuron could not be loaded.", err); });
  }

  A.views.neuron = function (node) {
    window.addEventListener("hashchange", function () { show(node); });
    show(node);
  };
})();
