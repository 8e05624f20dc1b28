// Applies the remembered light/dark theme before the page paints (loaded without defer in <head>).
(function () {
  var stored = null;
  try { stored = localStorage.getItem("nimbus-theme"); } catch (e) { /* storage disabled */ }
  var theme = stored || (window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  document.documentElement.setAttribute("data-bs-theme", theme);
})();
