// Live refresh without reloading the page: every data-refresh seconds, fetch this page again and replace
// each element marked data-live (by id) with the new one. Forms sit outside those elements, so what a
// reviewer is typing is never replaced. An element marked data-reload (the jobs and their states) that
// changes reloads the whole page instead (a new job, a preview, the review buttons), unless something has
// been typed into a form. No framework, no build step.
(function () {
  "use strict";
  var seconds = parseFloat(document.body.getAttribute("data-refresh") || "0");
  if (!(seconds > 0) || !document.querySelector("[data-live]")) { return; }
  var stamp = document.getElementById("live-stamp");
  function refresh() {
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live-Refresh": "1" } })
      .then(function (response) {
        if (!response.ok || response.redirected) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html");
        var typed = Array.prototype.some.call(document.querySelectorAll("input:not([type=hidden])"),
                                              function (input) { return input.value !== ""; });
        var reshaped = Array.prototype.some.call(document.querySelectorAll("[data-reload]"), function (old) {
          var next = old.id && fresh.getElementById(old.id);
          return next && next.textContent !== old.textContent;
        });
        if (reshaped && !typed) { window.location.reload(); return; }
        document.querySelectorAll("[data-live]").forEach(function (old) {
          var next = old.id && fresh.getElementById(old.id);
          if (next && next.innerHTML !== old.innerHTML) { old.innerHTML = next.innerHTML; }
        });
        if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); }
        window.setTimeout(refresh, seconds * 1000);
      })
      .catch(function (err) {
        if (stamp) { stamp.textContent = "not refreshing (" + err.message + "): reload the page"; }
      });
  }
  window.setTimeout(refresh, seconds * 1000);
})();
