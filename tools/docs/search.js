// Offline search over page titles and API names; the index is window.NNTRAIN_SEARCH (search_index.js).
(function () {
  "use strict";
  function rank(item, q) {
    var n = item.n.toLowerCase(), last = n.split(".").pop();
    if (n === q || last === q) return 0;
    if (n.indexOf(q) === 0 || last.indexOf(q) === 0) return 1;
    if (n.indexOf(q) >= 0) return 2;
    if ((item.d || "").toLowerCase().indexOf(q) >= 0) return 3;
    return -1;
  }
  function search(q) {
    q = q.trim().toLowerCase();
    if (!q) return [];
    var hits = [];
    (window.NNTRAIN_SEARCH || []).forEach(function (item) {
      var r = rank(item, q);
      if (r >= 0) hits.push([r * 2 + (item.k === "page" ? 1 : 0), item.n.length, item]);
    });
    hits.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1] || (a[2].n < b[2].n ? -1 : 1); });
    return hits.slice(0, 25).map(function (h) { return h[2]; });
  }
  function show(box, list) {
    var hits = search(box.value);
    list.innerHTML = "";
    hits.forEach(function (item) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = (window.NNTRAIN_ROOT || "") + item.u;
      a.textContent = item.n;
      var kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = item.k;
      li.appendChild(a);
      li.appendChild(kind);
      if (item.d) {
        var d = document.createElement("span");
        d.className = "desc";
        d.textContent = item.d;
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
  window.nntrainSearch = search;
})();
