// Small behaviours shared by every page: the theme toggle and copy-to-clipboard buttons.
(function () {
  function setTheme(theme) {
    document.documentElement.setAttribute("data-bs-theme", theme);
    try { localStorage.setItem("nimbus-theme", theme); } catch (e) { /* storage disabled */ }
    document.querySelectorAll("[data-theme-label]").forEach(function (el) {
      el.textContent = theme === "dark" ? "Light mode" : "Dark mode";
    });
  }

  function copyText(text, button) {
    function done() {
      var original = button.innerHTML;
      button.innerHTML = '<i class="bi bi-check2" aria-hidden="true"></i> Copied';
      setTimeout(function () { button.innerHTML = original; }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done);
      return;
    }
    // Plain-HTTP fallback: the Clipboard API needs a secure context.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); done(); } finally { document.body.removeChild(area); }
  }

  document.addEventListener("click", function (event) {
    var toggle = event.target.closest("[data-theme-toggle]");
    if (toggle) {
      event.preventDefault();
      var current = document.documentElement.getAttribute("data-bs-theme");
      setTheme(current === "dark" ? "light" : "dark");
      return;
    }
    var copy = event.target.closest("[data-copy-target]");
    if (copy) {
      var source = document.getElementById(copy.getAttribute("data-copy-target"));
      if (source) copyText(source.value !== undefined && source.tagName !== "CODE" && source.tagName !== "PRE"
        ? source.value : source.textContent, copy);
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    setTheme(document.documentElement.getAttribute("data-bs-theme") || "light");
  });
})();
