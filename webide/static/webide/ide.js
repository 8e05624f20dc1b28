// The WebIDE: Monaco (loaded from our static files with its AMD loader) wired to the IDE's WebSocket
// (webide/consumers.py). One draft version for the whole function: every save says which version
// it was based on, and a stale save comes back as a conflict that the user resolves in a diff.
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("ide-config").textContent);
  var root = document.getElementById("ide");
  var vs = root.dataset.vs;
  var $ = function (id) { return document.getElementById(id); };

  // Workers come from a small bootstrap in our static files, which imports Monaco's worker main.
  window.MonacoEnvironment = {
    getWorkerUrl: function () {
      var base = new URL(vs, window.location.href).href;
      return root.dataset.worker + "?vs=" + encodeURIComponent(base);
    },
  };

  var state = {
    files: {},          // path -> {model, saved (text as last saved/loaded)}
    order: [],
    active: null,
    version: null,
    permissions: [],
    fn: null,
    user: null,
    testSignature: null,
    testEvents: [],
    revisions: [],
    conflict: null,
    deployRevision: null,
    logsRunning: false,
    logsSubscribed: false,
  };
  var monaco, editor, bodyEditor, diffEditor;
  var socket, nextId = 1, pending = {}, reconnectDelay = 500, closedForGood = false;

  // ---- small helpers ----------------------------------------------------------------------------

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "className") node.className = attrs[k]; else node.setAttribute(k, attrs[k]);
    });
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function can(action) { return state.permissions.indexOf(action) >= 0; }
  function notice(text) {
    var box = $("ide-notice");
    box.textContent = text;
    box.classList.toggle("d-none", !text);
  }
  function showError(text) {
    var box = $("ide-error");
    box.textContent = text || "";
    box.classList.toggle("d-none", !text);
    if (text) setTimeout(function () { if (box.textContent === text) showError(""); }, 12000);
  }
  function isDirty(path) {
    var f = state.files[path];
    return !!f && f.model.getValue() !== f.saved;
  }
  function anyDirty() { return state.order.some(isDirty); }
  function languageFor(path) {
    var dot = path.lastIndexOf(".");
    var ext = dot >= 0 ? path.slice(dot).toLowerCase() : "";
    var names = { "requirements.txt": "plaintext", "Dockerfile": "dockerfile" };
    var base = path.split("/").pop();
    if (names[base]) return names[base];
    var found = monaco.languages.getLanguages().find(function (l) {
      return (l.extensions || []).indexOf(ext) >= 0;
    });
    return found ? found.id : "plaintext";
  }

  // ---- the WebSocket ----------------------------------------------------------------------------

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + config.wsPath);
    socket.onopen = function () {
      reconnectDelay = 500;
      setConnection("Connected", "success");
      request("open");
      if (state.logsSubscribed) subscribeLogs();
    };
    socket.onmessage = function (ev) { receive(JSON.parse(ev.data)); };
    socket.onclose = function (ev) {
      Object.keys(pending).forEach(function (id) { pending[id].reject(new Error("disconnected")); });
      pending = {};
      if (ev.code >= 4400 && ev.code < 4500) {
        closedForGood = true;
        setConnection(ev.code === 4401 ? "Signed out" : ev.code === 4403 ? "Access changed" : "No access", "danger");
        return;
      }
      setConnection("Reconnecting…", "warning");
      setTimeout(connect, reconnectDelay);
      reconnectDelay = Math.min(reconnectDelay * 2, 10000);
    };
  }
  function setConnection(text, tone) {
    var badge = $("ide-connection");
    badge.textContent = text;
    badge.className = "badge text-bg-" + tone;
  }
  // Send an action; the promise settles with its main answer (other answers, such as markers, come
  // alongside and go to their handlers). Actions whose main answer is not the first name it.
  var MAIN_REPLY = { deploy: "deployed", rollback: "rolled_back", test_event_save: "test_event_saved",
    test_event_delete: "test_event_deleted", logs: "logs_state" };
  function request(action, payload) {
    var id = nextId++;
    var message = Object.assign({ action: action, id: id }, payload || {});
    return new Promise(function (resolve, reject) {
      if (!socket || socket.readyState !== WebSocket.OPEN) { reject(new Error("not connected")); return; }
      pending[id] = { resolve: resolve, reject: reject, expect: MAIN_REPLY[action] };
      socket.send(JSON.stringify(message));
    });
  }
  function receive(msg) {
    var handler = handlers[msg.type];
    if (handler) handler(msg);
    var p = msg.reply_to != null ? pending[msg.reply_to] : null;
    if (!p) return;
    if (msg.type === "error") {
      delete pending[msg.reply_to];
      p.reject(msg);
    } else if (!p.expect || p.expect === msg.type) {
      delete pending[msg.reply_to];
      p.resolve(msg);
    }
  }

  var handlers = {
    opened: function (msg) {
      var first = state.version === null;
      state.fn = msg.function;
      state.permissions = msg.permissions;
      state.user = msg.user;
      state.testSignature = msg.test_signature || null;
      if (first || !anyDirty()) {
        loadFiles(msg.files, msg.source_version);
      }
      setMarkers(msg.markers, null);
      renderRevisions(msg.revisions);
      renderTestEvents(msg.test_events);
      renderTriggers(msg.triggers);
      applyPermissions();
    },
    files: function (msg) { loadFiles(msg.files, msg.source_version); },
    saved: function (msg) { setVersion(msg.version); },
    created: function (msg) { setVersion(msg.version); addFile(msg.path, msg.content); openFile(msg.path); },
    renamed: function (msg) { setVersion(msg.version); renameFile(msg.path, msg.new_path); },
    deleted: function (msg) { setVersion(msg.version); removeFile(msg.path); },
    conflict: function (msg) { showConflict(msg); },
    markers: function (msg) { setMarkers(msg.markers, msg.paths); },
    revisions: function (msg) { renderRevisions(msg.revisions); },
    test_events: function (msg) { renderTestEvents(msg.test_events); },
    test_signature: function (msg) { state.testSignature = msg.signature; },
    presence: function (msg) { renderPresence(msg.users); },
    closing: function (msg) { showError(msg.detail); },
    event: function (msg) { onFunctionEvent(msg.event); },
    logs: function (msg) { appendLogs(msg.lines, msg.reset); },
    logs_state: function (msg) {
      state.logsRunning = msg.running;
      $("logs-toggle").textContent = msg.running ? "Pause" : "Resume";
    },
    deployed: function (msg) {
      $("ide-deploy").disabled = !can("deploy");
      var ok = msg.status === "ready";
      $("deploy-summary").textContent = "Revision " + msg.revision + (ok ? " is ready." : " " + msg.status +
        (msg.status_message ? ": " + msg.status_message : "."));
    },
    error: function (msg) {
      // A missing invocation record is retried by showInvocation before it says anything.
      if (!(msg.action === "invocation" && msg.code === "not_found")) showError(msg.detail || "Something went wrong.");
      if (msg.action === "deploy") {
        $("ide-deploy").disabled = !can("deploy");
        $("deploy-summary").textContent = "Deploy refused: " + msg.detail;
      }
    },
  };

  // ---- files, tabs, editor ----------------------------------------------------------------------

  function setVersion(v) {
    state.version = v;
    $("ide-version").textContent = v;
  }
  function loadFiles(files, version) {
    var seen = {};
    files.forEach(function (f) {
      seen[f.path] = true;
      var existing = state.files[f.path];
      if (existing) {
        if (!isDirty(f.path) && existing.model.getValue() !== f.content) existing.model.setValue(f.content);
        existing.saved = f.content;
      } else {
        addFile(f.path, f.content);
      }
    });
    state.order.slice().forEach(function (p) { if (!seen[p] && !isDirty(p)) removeFile(p); });
    setVersion(version);
    if (!state.active || !state.files[state.active]) {
      var preferred = state.order.find(function (p) { return /^handler\.(py|js)$/.test(p); }) || state.order[0];
      if (preferred) openFile(preferred);
    }
    renderFiles();
  }
  function addFile(path, content) {
    var uri = monaco.Uri.parse("file:///" + path);
    var model = monaco.editor.getModel(uri) || monaco.editor.createModel(content, languageFor(path), uri);
    model.setValue(content);
    state.files[path] = { model: model, saved: content };
    model.onDidChangeContent(function () { renderDirty(); scheduleSyntaxCheck(path); });
    if (state.order.indexOf(path) < 0) state.order.push(path);
    state.order.sort();
    renderFiles();
  }
  function removeFile(path) {
    var f = state.files[path];
    if (!f) return;
    f.model.dispose();
    delete state.files[path];
    state.order = state.order.filter(function (p) { return p !== path; });
    if (state.active === path) {
      state.active = null;
      if (state.order.length) openFile(state.order[0]); else editor.setModel(null);
    }
    renderFiles();
  }
  function renameFile(path, newPath) {
    var f = state.files[path];
    if (!f) return;
    var text = f.model.getValue(), saved = f.saved, wasActive = state.active === path;
    removeFile(path);
    addFile(newPath, saved);
    state.files[newPath].model.setValue(text);
    if (wasActive) openFile(newPath);
  }
  function openFile(path) {
    if (!state.files[path]) return;
    state.active = path;
    editor.setModel(state.files[path].model);
    renderFiles();
    editor.focus();
  }
  function renderFiles() {
    var list = $("ide-files");
    list.textContent = "";
    var folders = {};
    state.order.forEach(function (path) {
      var parts = path.split("/");
      for (var i = 1; i < parts.length; i++) {
        var folder = parts.slice(0, i).join("/");
        if (!folders[folder]) {
          folders[folder] = true;
          var li = el("li", { className: "folder", style: "padding-left:" + (0.4 + (i - 1) * 0.8) + "rem" });
          li.innerHTML = '<i class="bi bi-folder2-open" aria-hidden="true"></i> ';
          li.appendChild(document.createTextNode(parts[i - 1]));
          list.appendChild(li);
        }
      }
      var item = el("li", { role: "option", tabindex: "0", "data-path": path,
        style: "padding-left:" + (0.4 + (parts.length - 1) * 0.8) + "rem",
        "aria-selected": String(path === state.active) });
      item.className = (path === state.active ? "active " : "") + (isDirty(path) ? "dirty" : "");
      item.textContent = (isDirty(path) ? "● " : "") + parts[parts.length - 1];
      item.addEventListener("click", function () { openFile(path); });
      item.addEventListener("keydown", function (e) { if (e.key === "Enter") openFile(path); });
      list.appendChild(item);
    });
    renderTabs();
  }
  // Tabs show the files opened in this session, each with its dirty marker.
  var openTabs = [];
  function renderTabs() {
    if (state.active && openTabs.indexOf(state.active) < 0) openTabs.push(state.active);
    openTabs = openTabs.filter(function (p) { return state.files[p]; });
    var tabs = $("ide-tabs");
    tabs.textContent = "";
    openTabs.forEach(function (path) {
      var tab = el("button", { type: "button", role: "tab", "data-path": path,
        "aria-selected": String(path === state.active) });
      tab.className = "nav-link" + (path === state.active ? " active" : "") + (isDirty(path) ? " dirty" : "");
      tab.textContent = path;
      tab.addEventListener("click", function () { openFile(path); });
      tab.addEventListener("auxclick", function (e) { if (e.button === 1) closeTab(path); });
      var close = el("span", { className: "ms-1 text-body-secondary", "aria-label": "Close " + path, role: "button" }, "×");
      close.addEventListener("click", function (e) { e.stopPropagation(); closeTab(path); });
      tab.appendChild(close);
      tabs.appendChild(tab);
    });
    $("ide-save").disabled = !can("change") || !state.active;
  }
  function closeTab(path) {
    openTabs = openTabs.filter(function (p) { return p !== path; });
    if (state.active === path && openTabs.length) openFile(openTabs[openTabs.length - 1]);
    renderTabs();
  }
  function renderDirty() {
    document.querySelectorAll("#ide-tabs [data-path], #ide-files [data-path]").forEach(function (node) {
      var dirty = isDirty(node.dataset.path);
      if (node.classList.contains("dirty") !== dirty) renderFiles();
    });
  }
  function applyPermissions() {
    var readOnly = !can("change");
    editor.updateOptions({ readOnly: readOnly });
    $("ide-readonly").classList.toggle("d-none", !readOnly);
    document.querySelectorAll(".ide-write").forEach(function (b) { b.classList.toggle("d-none", readOnly); });
    $("ide-save").disabled = readOnly;
    $("ide-deploy").disabled = !can("deploy");
  }

  // ---- saving and conflicts ---------------------------------------------------------------------

  function save(path) {
    path = path || state.active;
    if (!path || !can("change")) return Promise.resolve();
    var f = state.files[path];
    var text = f.model.getValue();
    return request("save", { path: path, content: text, base_version: state.version }).then(function (msg) {
      if (msg.type === "saved") {
        f.saved = text;
        renderFiles();
        notice("");
      }
      return msg;
    }).catch(function (err) { if (err && err.detail) showError(err.detail); throw err; });
  }
  function saveAll() {
    var dirty = state.order.filter(isDirty);
    return dirty.reduce(function (chain, path) {
      return chain.then(function (prev) {
        if (prev && prev.type === "conflict") return prev;
        return save(path);
      });
    }, Promise.resolve(null));
  }
  function showConflict(msg) {
    state.conflict = msg;
    var theirs = msg.theirs === null || msg.theirs === undefined ? "" : msg.theirs;
    openDiff("Conflict in " + msg.path + ": theirs (version " + msg.current_version + ", left) vs. mine (right, editable)",
      theirs, msg.mine, msg.path, true);
    $("conflict-theirs").classList.remove("d-none");
    $("conflict-mine").classList.remove("d-none");
    notice(msg.detail);
  }
  function resolveConflict(takeMine) {
    var c = state.conflict;
    if (!c) return;
    var f = state.files[c.path];
    var mine = diffEditor.getModifiedEditor().getValue();
    if (takeMine) {
      request("save", { path: c.path, content: mine, base_version: c.current_version }).then(function (msg) {
        if (msg.type === "saved") {
          f.model.setValue(mine);
          f.saved = mine;
          closeDiff();
          notice("Saved your version over theirs.");
          renderFiles();
        }
      }).catch(function (err) { showError(err.detail || "Save failed."); });
    } else {
      closeDiff();
      // Take the whole draft as it is now, keeping other unsaved buffers.
      request("files").then(function () {
        var theirs = c.theirs === null || c.theirs === undefined ? "" : c.theirs;
        f.model.setValue(theirs);
        f.saved = theirs;
        renderFiles();
        notice("Took their version of " + c.path + ".");
      });
    }
  }
  function openDiff(title, left, right, path, editable) {
    $("diff-title").textContent = title;
    $("ide-diff").classList.remove("d-none");
    var lang = languageFor(path || "x.txt");
    var old = diffEditor.getModel();
    diffEditor.setModel({
      original: monaco.editor.createModel(left, lang),
      modified: monaco.editor.createModel(right, lang),
    });
    if (old) { old.original.dispose(); old.modified.dispose(); }
    diffEditor.getModifiedEditor().updateOptions({ readOnly: !editable });
    diffEditor.layout();
  }
  function closeDiff() {
    state.conflict = null;
    $("ide-diff").classList.add("d-none");
    $("conflict-theirs").classList.add("d-none");
    $("conflict-mine").classList.add("d-none");
    $("diff-file").classList.add("d-none");
    editor.focus();
  }

  // ---- markers (syntax errors) ------------------------------------------------------------------

  function setMarkers(markers, paths) {
    var byPath = {};
    (markers || []).forEach(function (m) { (byPath[m.path] = byPath[m.path] || []).push(m); });
    var targets = paths || state.order;
    targets.forEach(function (p) {
      var f = state.files[p];
      if (!f) return;
      monaco.editor.setModelMarkers(f.model, "nimbus", (byPath[p] || []).map(function (m) {
        return { startLineNumber: m.line, startColumn: m.column, endLineNumber: m.end_line || m.line,
          endColumn: Math.max(m.end_column || m.column + 1, m.column + 1), message: m.message,
          severity: monaco.MarkerSeverity.Error };
      }));
    });
    renderProblems();
  }
  function renderProblems() {
    var list = $("ide-problems");
    list.textContent = "";
    var all = monaco.editor.getModelMarkers({ owner: "nimbus" });
    if (!all.length) { list.appendChild(el("li", { className: "text-body-secondary" }, "None.")); return; }
    all.forEach(function (m) {
      var path = m.resource.path.replace(/^\//, "");
      var li = el("li", { className: "text-danger", role: "button", tabindex: "0" },
        path + ":" + m.startLineNumber + ":" + m.startColumn + " " + m.message);
      li.addEventListener("click", function () {
        openFile(path);
        editor.setPosition({ lineNumber: m.startLineNumber, column: m.startColumn });
        editor.revealLineInCenter(m.startLineNumber);
      });
      list.appendChild(li);
    });
  }
  var syntaxTimer = null;
  function scheduleSyntaxCheck(path) {
    if (!/\.py$/.test(path)) return;
    clearTimeout(syntaxTimer);
    syntaxTimer = setTimeout(function () {
      var buffers = {};
      buffers[path] = state.files[path] ? state.files[path].model.getValue() : "";
      request("syntax", { files: buffers }).catch(function () {});
    }, 700);
  }

  // ---- deploy -----------------------------------------------------------------------------------

  function deploy() {
    if (!can("deploy")) return;
    $("ide-deploy").disabled = true;
    $("deploy-steps").textContent = "";
    $("deploy-summary").textContent = "Saving and deploying…";
    state.deployRevision = null;
    bootstrap.Tab.getOrCreateInstance($("tab-deploy")).show();
    saveAll().then(function (last) {
      if (last && last.type === "conflict") {
        $("ide-deploy").disabled = false;
        $("deploy-summary").textContent = "Resolve the conflict, then deploy.";
        return;
      }
      return request("deploy", {});
    }).catch(function (err) {
      $("ide-deploy").disabled = !can("deploy");
      if (err && err.detail) $("deploy-summary").textContent = "Deploy refused: " + err.detail;
    });
  }
  function onFunctionEvent(ev) {
    if (ev.kind === "deploy.progress") {
      if (state.deployRevision !== ev.revision) {
        state.deployRevision = ev.revision;
        $("deploy-steps").textContent = "";
      }
      $("deploy-summary").textContent = "Revision " + ev.revision + ": " + ev.step + " " + ev.status;
      var id = "deploy-step-" + ev.revision + "-" + ev.step;
      var item = $(id);
      if (!item) {
        item = el("li", { id: id });
        $("deploy-steps").appendChild(item);
      }
      item.className = "deploy-step " + ev.status;
      item.textContent = "";
      item.appendChild(el("strong", {}, ev.step));
      item.appendChild(el("span", { className: "ms-1 badge text-bg-" + (ev.status === "ok" ? "success" :
        ev.status === "failed" ? "danger" : "info") }, ev.status));
      if (ev.message) item.appendChild(el("div", {}, ev.message));
      if (ev.output) item.appendChild(el("pre", {}, ev.output));
      if (ev.step === "done") {
        $("ide-deploy").disabled = !can("deploy");
        request("revisions").catch(function () {});
      }
    } else if (ev.kind === "source.saved" && !ev.mine) {
      var paths = (ev.paths || []).join(", ");
      if (!anyDirty()) {
        // Nothing unsaved here: follow their save silently.
        request("files").catch(function () {});
        notice(ev.by + " saved " + paths + " (version " + ev.version + "); your editor follows it.");
      } else {
        notice(ev.by + " saved " + paths + " (version " + ev.version + "). Saving now will show you the conflict.");
      }
    }
  }

  // ---- presence ---------------------------------------------------------------------------------

  function renderPresence(users) {
    var box = $("ide-presence");
    box.textContent = "";
    users.forEach(function (u) {
      var label = u.user + (u.me ? " (you)" : "") + (u.editors > 1 ? " ×" + u.editors : "");
      var badge = el("span", { className: "badge rounded-pill " + (u.me ? "text-bg-light border" : "text-bg-primary"),
        title: u.user + " has this function open" }, label);
      box.appendChild(badge);
    });
  }

  // ---- revisions and diffs ----------------------------------------------------------------------

  // What starts this function besides HTTP: cron schedules and CloudEvent filters (read-only here).
  function renderTriggers(triggers) {
    $("triggers-http").textContent = state.fn ? state.fn.invoke_path : "";
    var body = $("triggers-body");
    body.textContent = "";
    if (!triggers || !triggers.length) {
      var empty = el("tr");
      empty.appendChild(el("td", { colspan: "4", className: "text-body-secondary" }, "No cron or event triggers."));
      body.appendChild(empty);
      return;
    }
    triggers.forEach(function (t) {
      var when = t.kind === "cron" ? t.schedule + " (" + (t.time_zone || "UTC") + ")" :
        (t.filters || []).map(function (f) {
          return f.attribute + (f.match === "prefix" ? " starts with " : " = ") + f.value;
        }).join(", ") || "every event";
      var tr = el("tr");
      tr.appendChild(el("td", { className: "mono" }, t.name));
      tr.appendChild(el("td", {}, t.kind === "cron" ? "cron" : "CloudEvent"));
      tr.appendChild(el("td", { className: "mono small" }, when));
      var badge = el("span", { className: "badge " + (t.enabled ? "text-bg-success" : "text-bg-secondary") },
        t.enabled ? "on" : "off");
      var cell = el("td");
      cell.appendChild(badge);
      tr.appendChild(cell);
      body.appendChild(tr);
    });
  }

  function renderRevisions(revisions) {
    state.revisions = revisions || [];
    var body = $("revisions-body");
    body.textContent = "";
    if (!state.revisions.length) {
      var empty = el("tr");
      empty.appendChild(el("td", { colspan: "6", className: "text-body-secondary" }, "No revisions yet."));
      body.appendChild(empty);
    }
    state.revisions.forEach(function (r) {
      var tr = el("tr");
      tr.appendChild(el("td", {}, String(r.number)));
      tr.appendChild(el("td", {}, r.author));
      tr.appendChild(el("td", { title: r.created_at }, new Date(r.created_at).toLocaleString()));
      tr.appendChild(el("td", { title: r.status_message || "" }, r.status));
      tr.appendChild(el("td", {}, r.percent ? r.percent + "%" : ""));
      var actions = el("td", { className: "text-end text-nowrap" });
      var diff = el("button", { type: "button", className: "btn btn-sm btn-link p-0 me-2" }, "vs draft");
      diff.addEventListener("click", function () { showRevisionDiff(String(r.number), "draft"); });
      actions.appendChild(diff);
      if (can("deploy") && r.status === "ready" && r.percent !== 100) {
        var rb = el("button", { type: "button", className: "btn btn-sm btn-outline-warning py-0" }, "Roll back");
        rb.addEventListener("click", function () {
          if (!window.confirm("Send all traffic to revision " + r.number + "?")) return;
          request("rollback", { number: r.number }).then(function () {
            notice("Traffic is back on revision " + r.number + ".");
          }).catch(function (err) { showError(err.detail || "Rollback failed."); });
        });
        actions.appendChild(rb);
      }
      tr.appendChild(actions);
      body.appendChild(tr);
    });
    ["diff-a", "diff-b"].forEach(function (id, i) {
      var select = $(id), current = select.value;
      select.textContent = "";
      select.appendChild(el("option", { value: "draft" }, "Draft"));
      state.revisions.forEach(function (r) {
        select.appendChild(el("option", { value: String(r.number) }, "Revision " + r.number));
      });
      select.value = current || (i === 0 && state.revisions.length ? String(state.revisions[0].number) : "draft");
    });
  }
  function filesOf(which) {
    if (which === "draft") {
      var files = {};
      state.order.forEach(function (p) { files[p] = state.files[p].model.getValue(); });
      return Promise.resolve(files);
    }
    return request("revision", { number: Number(which) }).then(function (msg) { return msg.files; });
  }
  function showRevisionDiff(a, b) {
    Promise.all([filesOf(a), filesOf(b)]).then(function (pair) {
      var left = pair[0], right = pair[1];
      var paths = Object.keys(Object.assign({}, left, right)).sort();
      var select = $("diff-file");
      select.textContent = "";
      paths.forEach(function (p) {
        var changed = left[p] !== right[p];
        select.appendChild(el("option", { value: p }, (changed ? "● " : "") + p));
      });
      var first = paths.find(function (p) { return left[p] !== right[p]; }) || paths[0];
      select.value = first;
      var label = function (x) { return x === "draft" ? "draft" : "revision " + x; };
      var show = function (p) {
        openDiff(label(a) + " → " + label(b) + ": " + p, left[p] || "", right[p] || "", p, false);
      };
      select.onchange = function () { show(select.value); };
      select.classList.remove("d-none");
      show(first);
    }).catch(function (err) { showError(err.detail || "Could not load the revision."); });
  }

  // ---- test events and the test panel -----------------------------------------------------------

  function renderTestEvents(events) {
    state.testEvents = events || [];
    var select = $("test-events"), current = select.value;
    select.textContent = "";
    select.appendChild(el("option", { value: "" }, "(unsaved event)"));
    state.testEvents.forEach(function (e) { select.appendChild(el("option", { value: String(e.id) }, e.name)); });
    if (state.testEvents.some(function (e) { return String(e.id) === current; })) select.value = current;
  }
  function parseHeaders(text) {
    var headers = {};
    text.split("\n").forEach(function (line) {
      var i = line.indexOf(":");
      if (i > 0) headers[line.slice(0, i).trim()] = line.slice(i + 1).trim();
    });
    return headers;
  }
  function currentTestEvent() {
    return { method: $("test-method").value, path: $("test-path").value, query: $("test-query").value,
      headers: parseHeaders($("test-headers").value), body: bodyEditor.getValue() };
  }
  function loadTestEvent(id) {
    var e = state.testEvents.find(function (x) { return String(x.id) === String(id); });
    if (!e) return;
    $("test-method").value = e.method;
    $("test-path").value = e.path;
    $("test-query").value = e.query;
    $("test-headers").value = Object.keys(e.headers || {}).map(function (k) { return k + ": " + e.headers[k]; }).join("\n");
    bodyEditor.setValue(e.body || "");
  }
  function saveTestEvent(asNew, rename) {
    var id = $("test-events").value;
    var existing = state.testEvents.find(function (x) { return String(x.id) === id; });
    var name = existing && !asNew ? existing.name : "";
    if (rename || asNew || !existing) {
      name = window.prompt("Name of the test event", name || "my event");
      if (!name) return;
    }
    var payload = Object.assign(currentTestEvent(), { name: name });
    if (existing && !asNew) {
      payload.event_id = existing.id;
      if (rename) payload = Object.assign({}, existing, { name: name, event_id: existing.id });
    }
    request("test_event_save", payload).then(function (msg) {
      $("test-events").value = String(msg.test_event.id);
      notice("Saved test event " + msg.test_event.name + ".");
    }).catch(function (err) { showError(err.detail || "Could not save the test event."); });
  }
  function deleteTestEvent() {
    var id = $("test-events").value;
    if (!id || !window.confirm("Delete this test event?")) return;
    request("test_event_delete", { event_id: Number(id) }).catch(function (err) { showError(err.detail); });
  }
  function sendTest() {
    var ev = currentTestEvent();
    var url = state.fn.invoke_path + ev.path.replace(/^\//, "") + (ev.query ? "?" + ev.query.replace(/^\?/, "") : "");
    var headers = Object.assign({}, ev.headers);
    var ready = Promise.resolve();
    if (state.fn.invoke_auth === "token" && can("change")) {
      // The signature is short-lived: fetch a fresh one for every call.
      ready = request("test_signature").then(function (msg) { headers["X-Nimbus-Test-Signature"] = msg.signature; });
    }
    var init = { method: ev.method, headers: headers, credentials: "omit", cache: "no-store" };
    if (ev.body && ev.method !== "GET" && ev.method !== "HEAD") {
      init.body = ev.body;
      if (!Object.keys(headers).some(function (h) { return h.toLowerCase() === "content-type"; })) {
        headers["Content-Type"] = "application/json";
      }
    }
    $("test-send").disabled = true;
    ready.then(function () {
      var started = performance.now();
      return fetch(url, init).then(function (response) {
        return response.text().then(function (text) { showResponse(response, text, performance.now() - started); });
      });
    }).catch(function (err) {
      showError("The request failed: " + (err.message || err.detail || err));
    }).finally(function () { $("test-send").disabled = false; });
  }
  function showResponse(response, text, ms) {
    $("test-result").classList.remove("d-none");
    var status = $("test-status");
    status.textContent = response.status + " " + response.statusText;
    status.className = "badge text-bg-" + (response.ok ? "success" : response.status >= 500 ? "danger" : "warning");
    $("test-duration").textContent = ms.toFixed(0) + " ms";
    var cold = (response.headers.get("X-Nimbus-Cold-Start") || "").toLowerCase();
    $("test-cold").classList.toggle("d-none", ["1", "true", "yes"].indexOf(cold) < 0);
    var lines = [];
    response.headers.forEach(function (v, k) { lines.push(k + ": " + v); });
    $("test-headers-out").textContent = lines.join("\n");
    var pretty = text;
    try { pretty = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not JSON: show as is */ }
    $("test-body-out").textContent = pretty;
    var invocation = response.headers.get("X-Nimbus-Invocation-Id");
    var link = $("test-invocation");
    link.classList.toggle("d-none", !invocation);
    $("test-invocation-logs").classList.add("d-none");
    $("test-trace").classList.add("d-none");
    if (invocation) {
      link.textContent = "invocation " + invocation.slice(0, 8) + "… logs";
      link.dataset.invocation = invocation;
    }
  }
  var LOG_LINE_ATTEMPTS = 10;
  function showInvocation(id, attempt, logAttempt) {
    attempt = attempt || 0;
    logAttempt = logAttempt || 0;
    request("invocation", { invocation_id: id }).then(function (msg) {
      var inv = msg.invocation;
      var head = "status " + inv.status + (inv.http_status ? " (" + inv.http_status + ")" : "") + ", " +
        inv.duration_ms.toFixed(1) + " ms" + (inv.cold_start ? ", cold start " + inv.init_ms.toFixed(0) + " ms" : "") +
        (inv.revision ? ", revision " + inv.revision : "") + (inv.error ? "\n" + inv.error : "");
      var body = msg.lines.map(function (l) { return l.time.slice(11, 23) + " " + l.level + " " + l.message; });
      // Log lines are written in the batch after their record: while none are in, look again a few times.
      var waiting = !body.length && logAttempt < LOG_LINE_ATTEMPTS;
      $("test-invocation-lines").textContent = head + "\n\n" +
        (body.join("\n") || (waiting ? "(waiting for log lines…)" : "(no log lines)"));
      $("test-invocation-logs").classList.remove("d-none");
      var trace = $("test-trace");
      trace.classList.toggle("d-none", !inv.trace_id);
      if (inv.trace_id) trace.href = config.tracesUrl + inv.trace_id + "/";
      if (waiting) setTimeout(function () { showInvocation(id, attempt, logAttempt + 1); }, 500);
    }).catch(function (err) {
      // The gateway writes invocation records just after answering: give it a moment.
      if (err && err.code === "not_found" && attempt < 10) {
        setTimeout(function () { showInvocation(id, attempt + 1); }, 500);
        return;
      }
      showError((err && err.detail) || "Invocation not found.");
    });
  }

  // ---- logs -------------------------------------------------------------------------------------

  function subscribeLogs() {
    state.logsSubscribed = true;
    request("logs", { op: "subscribe", text: $("logs-text").value, level: $("logs-level").value }).catch(function () {});
  }
  function appendLogs(lines, reset) {
    var box = $("logs-lines");
    if (reset) box.textContent = "";
    var atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    lines.forEach(function (l) {
      var line = el("div", { className: "ide-log-" + l.level, title: "invocation " + l.invocation },
        l.time.slice(0, 23).replace("T", " ") + " " + l.level.padEnd(7) + " " + l.message);
      box.appendChild(line);
    });
    while (box.childNodes.length > 2000) box.removeChild(box.firstChild);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  // ---- uploads ----------------------------------------------------------------------------------

  function upload(fileList) {
    if (!fileList.length) return;
    var form = new FormData();
    Array.prototype.forEach.call(fileList, function (f) { form.append("files", f); });
    form.append("base_version", state.version);
    var replace = Array.prototype.some.call(fileList, function (f) { return /\.zip$/i.test(f.name); }) &&
      window.confirm("Replace the whole draft with the archive? (Cancel adds its files to the draft.)");
    if (replace) form.append("replace", "1");
    var csrf = (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || "";
    fetch(config.uploadUrl, { method: "POST", body: form, headers: { "X-CSRFToken": decodeURIComponent(csrf) },
      credentials: "same-origin" }).then(function (response) {
      return response.json().catch(function () { return { detail: "Upload failed (" + response.status + ")." }; })
        .then(function (data) {
          if (!response.ok) { showError(data.detail || "Upload failed."); return; }
          notice("Uploaded " + data.paths.join(", ") + ".");
          request("files");
        });
    });
  }

  // ---- start ------------------------------------------------------------------------------------

  function themeChoice() {
    var stored = null;
    try { stored = localStorage.getItem("nimbus-ide-theme"); } catch (e) { /* storage disabled */ }
    return stored || "auto";
  }
  function applyTheme(choice) {
    var theme = choice === "auto"
      ? (document.documentElement.getAttribute("data-bs-theme") === "dark" ? "vs-dark" : "vs") : choice;
    monaco.editor.setTheme(theme);
  }

  function wire() {
    $("ide-save").addEventListener("click", function () { save(); });
    $("ide-deploy").addEventListener("click", deploy);
    $("conflict-theirs").addEventListener("click", function () { resolveConflict(false); });
    $("conflict-mine").addEventListener("click", function () { resolveConflict(true); });
    $("diff-close").addEventListener("click", closeDiff);
    $("diff-show").addEventListener("click", function () { showRevisionDiff($("diff-a").value, $("diff-b").value); });
    $("file-new").addEventListener("click", function () {
      var path = window.prompt("New file path (e.g. lib/util.py)");
      if (path) request("create", { path: path, content: "", base_version: state.version })
        .catch(function (err) { showError(err.detail); });
    });
    $("file-rename").addEventListener("click", function () {
      if (!state.active) return;
      if (isDirty(state.active)) { showError("Save the file before renaming it."); return; }
      var path = window.prompt("Rename " + state.active + " to", state.active);
      if (path && path !== state.active) request("rename", { path: state.active, new_path: path, base_version: state.version })
        .catch(function (err) { showError(err.detail); });
    });
    $("file-delete").addEventListener("click", function () {
      if (!state.active || !window.confirm("Delete " + state.active + "?")) return;
      request("delete", { path: state.active, base_version: state.version }).catch(function (err) { showError(err.detail); });
    });
    $("file-upload").addEventListener("change", function (e) { upload(e.target.files); e.target.value = ""; });
    $("test-send").addEventListener("click", sendTest);
    $("test-events").addEventListener("change", function (e) { loadTestEvent(e.target.value); });
    $("test-event-save").addEventListener("click", function () { saveTestEvent(false, false); });
    $("test-event-save-as").addEventListener("click", function () { saveTestEvent(true, false); });
    $("test-event-rename").addEventListener("click", function () { saveTestEvent(false, true); });
    $("test-event-delete").addEventListener("click", deleteTestEvent);
    $("test-invocation").addEventListener("click", function (e) {
      e.preventDefault();
      showInvocation(e.currentTarget.dataset.invocation);
    });
    $("tab-logs").addEventListener("shown.bs.tab", function () { if (!state.logsSubscribed) subscribeLogs(); });
    $("logs-toggle").addEventListener("click", function () {
      request("logs", { op: state.logsRunning ? "pause" : "resume" }).catch(function () {});
    });
    $("logs-clear").addEventListener("click", function () { $("logs-lines").textContent = ""; });
    var filterTimer = null;
    ["logs-text", "logs-level"].forEach(function (id) {
      $(id).addEventListener(id === "logs-text" ? "input" : "change", function () {
        clearTimeout(filterTimer);
        filterTimer = setTimeout(subscribeLogs, 300);
      });
    });
    var themeSelect = $("ide-theme");
    themeSelect.value = themeChoice();
    themeSelect.addEventListener("change", function () {
      try { localStorage.setItem("nimbus-ide-theme", themeSelect.value); } catch (e) { /* storage disabled */ }
      applyTheme(themeSelect.value);
    });
    // The page's light/dark toggle changes data-bs-theme; follow it when the IDE theme is "auto".
    new MutationObserver(function () { applyTheme(themeSelect.value); })
      .observe(document.documentElement, { attributes: true, attributeFilter: ["data-bs-theme"] });
    document.addEventListener("keydown", function (e) {
      var mod = e.ctrlKey || e.metaKey;
      if (mod && !e.shiftKey && e.key.toLowerCase() === "s") { e.preventDefault(); save(); }
      if (mod && e.shiftKey && e.key.toLowerCase() === "d") { e.preventDefault(); deploy(); }
    });
    window.addEventListener("beforeunload", function (e) {
      if (anyDirty()) { e.preventDefault(); e.returnValue = ""; }
    });
  }

  // Monaco's AMD loader defines a global define(); loaded before the page's UMD bundles (Bootstrap,
  // htmx) it would capture them as AMD modules, so it comes last, from this deferred script.
  var loader = document.createElement("script");
  loader.src = root.dataset.loader;
  loader.onload = start;
  document.head.appendChild(loader);

  function start() {
  window.require.config({ paths: { vs: vs } });
  window.require(["vs/editor/editor.main"], function () {
    monaco = window.monaco;
    editor = monaco.editor.create($("ide-editor"), {
      model: null, automaticLayout: true, minimap: { enabled: false }, fontSize: 13, tabSize: 4,
      scrollBeyondLastLine: false,
    });
    bodyEditor = monaco.editor.create($("test-body"), {
      model: monaco.editor.createModel("", "json", monaco.Uri.parse("inmemory://test-body.json")),
      automaticLayout: true, minimap: { enabled: false }, lineNumbers: "off", fontSize: 12,
      scrollBeyondLastLine: false,
    });
    diffEditor = monaco.editor.createDiffEditor($("diff-editor"), {
      automaticLayout: true, renderSideBySide: true, minimap: { enabled: false }, originalEditable: false,
    });
    // Inside Monaco the browser's shortcuts do not reach the document listener first.
    editor.addCommand(monaco.KeyMod.CtrlCmd | monaco.KeyCode.KeyS, function () { save(); });
    editor.addCommand(monaco.KeyMod.CtrlCmd | monaco.KeyMod.Shift | monaco.KeyCode.KeyD, deploy);
    monaco.editor.onDidChangeMarkers(renderProblems);
    applyTheme(themeChoice());
    wire();
    connect();
    window.nimbusIde = { state: state, editor: editor, bodyEditor: bodyEditor, diffEditor: diffEditor,
      request: request, save: save, deploy: deploy, isDirty: isDirty };
  });
  }
})();
