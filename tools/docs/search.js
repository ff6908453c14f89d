// Offline full-text search: page and section prose, API names, docstrings, parameter names and descriptions.
// The index is window.NNTRAIN_SEARCH (search_index.js): {n: name, u: url, k: kind, d: summary, p: [[param, text]],
// t: full text}.
(function () {
  "use strict";
  var API_FIRST = {page: 1, section: 1};

  function snippet(text, at, len) {
    var start = Math.max(0, at - 70), end = Math.min(text.length, at + len + 90);
    return (start ? "…" : "") + text.slice(start, end) + (end < text.length ? "…" : "");
  }

  // [rank, what matched] for one item, or null: names first, then parameters, then descriptions, then prose
  function match(item, q) {
    var n = item.n.toLowerCase(), last = n.split(".").pop(), ps = item.p || [], i;
    var api = !API_FIRST[item.k];
    if (api && (n === q || last === q)) return [0];
    if (api && (n.indexOf(q) === 0 || last.indexOf(q) === 0)) return [1];
    if (n.indexOf(q) >= 0) return [api ? 2 : 3];
    for (i = 0; i < ps.length; i++) {
      if (ps[i][0].toLowerCase() === q) return [4, "parameter " + ps[i][0] + (ps[i][1] ? ": " + ps[i][1] : "")];
    }
    if ((item.d || "").toLowerCase().indexOf(q) >= 0) return [5];
    for (i = 0; i < ps.length; i++) {
      if ((ps[i][1] || "").toLowerCase().indexOf(q) >= 0) return [6, "parameter " + ps[i][0] + ": " + ps[i][1]];
    }
    var t = item.t || "", tl = t.toLowerCase(), at = tl.indexOf(q), words = q.split(/\s+/).filter(Boolean);
    if (at < 0 && words.length > 1 && words.every(function (w) { return tl.indexOf(w) >= 0; })) {
      at = tl.indexOf(words[0]);
      return [8, snippet(t, at, words[0].length)];
    }
    return at < 0 ? null : [7, snippet(t, at, q.length)];
  }

  function search(q) {
    q = q.trim().toLowerCase();
    if (!q) return [];
    var hits = [];
    (window.NNTRAIN_SEARCH || []).forEach(function (item) {
      var m = match(item, q);
      if (m) hits.push({rank: m[0] * 2 + (API_FIRST[item.k] ? 1 : 0), why: m[1], item: item});
    });
    hits.sort(function (a, b) {
      return a.rank - b.rank || a.item.n.length - b.item.n.length || (a.item.n < b.item.n ? -1 : 1);
    });
    return hits.slice(0, 30);
  }

  function show(box, list) {
    var hits = search(box.value);
    list.innerHTML = "";
    hits.forEach(function (h) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = (window.NNTRAIN_ROOT || "") + h.item.u;
      a.textContent = h.item.n;
      var kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = h.item.k;
      li.appendChild(a);
      li.appendChild(kind);
      var text = h.why || h.item.d;
      if (text) {
        var d = document.createElement("span");
        d.className = h.why ? "desc why" : "desc";
        d.textContent = text;
        li.appendChild(d);
      }
      list.appendChild(li);
    });
    list.hidden = hits.length === 0;
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("search-box"), list = document.getElementById("search-results");
    if (!box || !list) return;
    box.addEventListener("input", function () { show(box, list); });
    box.addEventListener("keydown", function (e) {
      if (e.key === "Enter") { var a = list.querySelector("a"); if (a) window.location.href = a.href; }
      if (e.key === "Escape") { box.value = ""; show(box, list); }
    });
    document.addEventListener("click", function (e) { if (!e.target.closest(".search")) list.hidden = true; });
    box.addEventListener("focus", function () { show(box, list); });
  });
  window.nntrainSearch = function (q) { return search(q).map(function (h) { return h.item; }); };
})();
