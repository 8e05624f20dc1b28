// The live tail on the Logs tab: the IDE's WebSocket consumer and its "logs" action, so both panels
// show the same lines by the same mechanism.
(function () {
  "use strict";
  var button = document.getElementById("live-tail");
  if (!button) return;
  var socket = null;
  var out = document.getElementById("tail-lines");
  var state = document.getElementById("tail-state");

  function append(lines) {
    lines.forEach(function (line) {
      out.textContent += line.time.slice(11, 23) + " " + line.level.padEnd(7) + " " +
        line.invocation.slice(0, 8) + "  " + line.message + "\n";
    });
    out.scrollTop = out.scrollHeight;
  }

  function start() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + button.dataset.wsPath);
    document.getElementById("tail-card").classList.remove("d-none");
    state.textContent = "connecting…";
    socket.onopen = function () {
      var form = button.form;
      socket.send(JSON.stringify({ action: "logs", op: "subscribe", id: 1,
                                   text: form.elements.q.value, level: form.elements.level.value }));
    };
    socket.onmessage = function (event) {
      var msg = JSON.parse(event.data);
      if (msg.type === "logs") { if (msg.reset) out.textContent = ""; append(msg.lines); }
      else if (msg.type === "logs_state") state.textContent = msg.running ? "following" : "paused";
      else if (msg.type === "error" && msg.action === "logs") state.textContent = msg.detail;
    };
    socket.onclose = function () { state.textContent = "stopped"; };
    button.setAttribute("aria-pressed", "true");
    button.innerHTML = '<i class="bi bi-pause-fill" aria-hidden="true"></i> Stop tail';
  }

  function stop() {
    if (socket) socket.close();
    socket = null;
    button.setAttribute("aria-pressed", "false");
    button.innerHTML = '<i class="bi bi-play-fill" aria-hidden="true"></i> Live tail';
  }

  button.addEventListener("click", function () { if (socket) stop(); else start(); });
})();
