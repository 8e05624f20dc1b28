// Starts one of Monaco's web workers from the portal's own static files (no CDN, no blob: URLs).
// The page passes the location of Monaco's "vs" folder in the query string.
var vs = new URL(self.location.href).searchParams.get("vs");
self.MonacoEnvironment = { baseUrl: vs.replace(/vs\/?$/, "") };
importScripts(vs + "/base/worker/workerMain.js");
