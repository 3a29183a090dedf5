// The browser probe: holds WebSocket connections back to the server that served this page,
// times an echoed message every so often, and logs every close in the words the
// websocket-test client uses. Plain script, no build step, no dependencies: the server
// inlines it into the page under a Content-Security-Policy that allows exactly this text.
"use strict";

(function () {
  // A silence this long before an end without a Close frame is called out, as the client does.
  const SILENT_DEATH_MS = 1000;
  // Round trips kept per connection for the sparkline and the percentiles.
  const SAMPLES_KEPT = 120;
  // Echoes still awaited per connection; older ones are forgotten.
  const PENDING_KEPT = 1000;
  const LOG_KEPT = 200;
  // Reconnect 1 s after a loss; each failed attempt in a row doubles the wait, up to 30 s.
  const RECONNECT_FIRST_MS = 1000;
  const RECONNECT_MAX_MS = 30000;
  const RENDER_EVERY_MS = 250;
  const SPARK = { width: 120, height: 28, slots: 30 };

  // The controls: [min, max, default] for numbers, the default for switches.
  const LIMITS = {
    connections: [1, 20, 1],
    size: [16, 65536, 32],
    rate: [0.1, 50, 1],
  };
  const SWITCHES = { reconnect: true, silent: false };

  const encoder = new TextEncoder();
  const byId = (id) => document.getElementById(id);

  // ---- settings: the controls, preset by the page's query (?connections=3&silent=1) ----

  function readSettings(query) {
    const settings = {};
    for (const [name, [min, max, fallback]] of Object.entries(LIMITS)) {
      const value = Number(query.get(name) ?? fallback);
      settings[name] = Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : fallback;
    }
    settings.connections = Math.round(settings.connections);
    settings.size = Math.round(settings.size);
    for (const [name, fallback] of Object.entries(SWITCHES)) {
      const value = query.get(name);
      settings[name] = value === null ? fallback : !["0", "false", "off", "no"].includes(value);
    }
    return settings;
  }

  const settings = readSettings(new URLSearchParams(window.location.search));

  function showSettings() {
    for (const name of Object.keys(LIMITS)) {
      byId(name).value = String(settings[name]);
    }
    for (const name of Object.keys(SWITCHES)) {
      byId(name).checked = settings[name];
    }
  }

  // Keeps the address bar in step with the controls, so a reload or a shared link keeps them.
  function rememberSettings() {
    const query = new URLSearchParams();
    for (const name of Object.keys(LIMITS)) {
      if (settings[name] !== LIMITS[name][2]) {
        query.set(name, String(settings[name]));
      }
    }
    for (const name of Object.keys(SWITCHES)) {
      if (settings[name] !== SWITCHES[name]) {
        query.set(name, settings[name] ? "1" : "0");
      }
    }
    const search = query.toString();
    window.history.replaceState(null, "", search ? "?" + search : window.location.pathname);
  }

  // ---- where to connect: the server's WebSocket path, beside this page ----

  // The page is at PREFIX/ui; the WebSocket path is resolved against PREFIX, so a proxy that
  // serves the server under a path prefix gets PREFIX/ws. ?hello asks for "hello from NAME".
  function socketUrl() {
    const path = document.querySelector('meta[name="websocket-path"]').content;
    const url = new URL(path.replace(/^\/+/, "") || "./", window.location.href);
    url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "?hello";
    url.hash = "";
    return url.href;
  }

  // ---- words and numbers, as the client's log lines write them ----

  function seconds(ms) {
    return (ms / 1000).toFixed(1) + "s";
  }

  function uptime(ms) {
    const total = Math.floor(ms / 1000);
    if (total < 60) {
      return seconds(ms);
    }
    const pad = (n) => String(n).padStart(2, "0");
    const [h, m, s] = [Math.floor(total / 3600), Math.floor(total / 60) % 60, total % 60];
    return h > 0 ? `${h}h ${pad(m)}m ${pad(s)}s` : `${m}m ${pad(s)}s`;
  }

  function millis(ms) {
    // Browsers coarsen their clock to 0.1 ms or so: more digits would be noise.
    return ms === null ? "–" : ms.toFixed(1) + " ms";
  }

  // Nearest-rank percentile of `values` (q in 0..1), or null for none.
  function percentile(values, q) {
    if (values.length === 0) {
      return null;
    }
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)];
  }

  // The close as the client tells a connection's end: how; who; what the connection did.
  function describeClose(probe, event, now) {
    const silence = now - probe.lastHeard;
    let how;
    let who;
    if (probe.closedByUs !== null) {
      how = `close ${probe.closedByUs.code} ${JSON.stringify(probe.closedByUs.reason)}`;
      who = "ended by us";
    } else if (event.wasClean && event.code !== 1006) {
      const close =
        event.code === 1005
          ? "close without status code"
          : `close ${event.code}` + (event.reason ? " " + JSON.stringify(event.reason) : "");
      how = "server closed the connection: " + close;
      who = "ended by the peer";
    } else {
      how = "connection closed without a close frame";
      who = "ended by the network";
    }
    how += ` (code ${event.code}, wasClean ${event.wasClean})`;
    const c = probe.counts;
    const activity =
      `age ${seconds(now - probe.openedAt)}, silent ${seconds(silence)}` +
      (probe.lastRtt === null ? "" : `, rtt ${probe.lastRtt.toFixed(2)}ms`) +
      `, in ${c.inMsgs} msgs ${c.inBytes} B, out ${c.outMsgs} msgs ${c.outBytes} B`;
    if (who === "ended by the network" && silence >= SILENT_DEATH_MS) {
      return `${how}; ${who}, died silent: nothing received for ${seconds(silence)} before the end; ${activity}`;
    }
    return `${how}; ${who}; ${activity}`;
  }

  // ---- the close log ----

  function log(probe, text, kind) {
    const entry = document.createElement("li");
    entry.className = kind;
    const time = document.createElement("time");
    time.textContent = new Date().toISOString();
    entry.append(time, ` [Connection ${probe.index}] ${text}`);
    const list = byId("log");
    list.prepend(entry);
    while (list.children.length > LOG_KEPT) {
      list.lastElementChild.remove();
    }
    byId("log-empty").hidden = true;
  }

  // ---- one connection ----

  class Probe {
    constructor(index) {
      this.index = index;
      this.socket = null;
      this.state = "connecting";
      this.backend = "–";
      this.opens = 0;
      this.failuresInRow = 0;
      this.samples = [];
      this.echoes = 0;
      this.retryAt = null;
      this.retryTimer = null;
      this.sendTimer = null;
      [this.row, this.cells] = makeRow(index);
      this.reset();
    }

    // Per-connection counters, fresh on every connect.
    reset() {
      this.openedAt = null;
      this.lastHeard = null;
      this.lastRtt = null;
      this.closedByUs = null;
      this.counts = { inMsgs: 0, inBytes: 0, outMsgs: 0, outBytes: 0 };
      this.pending = new Map();
      this.seq = 0;
    }

    connect() {
      this.reset();
      this.state = "connecting";
      this.retryAt = null;
      this.retryTimer = null;
      const socket = new WebSocket(socketUrl());
      this.socket = socket;
      socket.onopen = () => this.opened();
      socket.onmessage = (event) => this.received(event.data);
      socket.onclose = (event) => this.closed(event);
    }

    opened() {
      const now = performance.now();
      this.state = "open";
      this.openedAt = now;
      this.lastHeard = now;
      this.opens += 1;
      this.failuresInRow = 0;
      this.schedule();
    }

    // (Re)starts the send timer for the current rate; silent mode sends nothing at all.
    schedule() {
      clearInterval(this.sendTimer);
      this.sendTimer = null;
      if (this.state === "open" && !settings.silent) {
        this.sendTimer = setInterval(() => this.send(), 1000 / settings.rate);
      }
    }

    send() {
      const socket = this.socket;
      // A message still queued in the browser would only measure the queue.
      if (socket.readyState !== WebSocket.OPEN || socket.bufferedAmount > 0) {
        return;
      }
      this.seq += 1;
      const head = `rtt ${this.seq} `;
      const message = head + ".".repeat(Math.max(0, settings.size - head.length));
      this.pending.set(this.seq, performance.now());
      if (this.pending.size > PENDING_KEPT) {
        this.pending.delete(this.pending.keys().next().value);
      }
      socket.send(message);
      this.counts.outMsgs += 1;
      this.counts.outBytes += message.length;
    }

    received(data) {
      const now = performance.now();
      this.lastHeard = now;
      const text = typeof data === "string" ? data : "";
      this.counts.inMsgs += 1;
      this.counts.inBytes += typeof data === "string" ? encoder.encode(data).length : data.size;
      if (this.counts.inMsgs === 1 && text.startsWith("hello from ")) {
        this.backend = text.slice("hello from ".length);
        return;
      }
      const seq = Number(text.split(" ", 2)[1]);
      const sent = this.pending.get(seq);
      if (text.startsWith("rtt ") && sent !== undefined) {
        this.pending.delete(seq);
        this.lastRtt = now - sent;
        this.echoes += 1;
        this.samples.push(this.lastRtt);
        if (this.samples.length > SAMPLES_KEPT) {
          this.samples.shift();
        }
      }
    }

    closed(event) {
      const now = performance.now();
      clearInterval(this.sendTimer);
      this.sendTimer = null;
      this.socket = null;
      const wanted = this.index <= settings.connections;
      let delay = null;
      if (wanted && settings.reconnect) {
        if (this.openedAt === null) {
          this.failuresInRow += 1;
        }
        delay = Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** Math.max(0, this.failuresInRow - 1));
      }
      const next = delay === null ? "" : `; reconnecting in ${seconds(delay)}`;
      if (this.openedAt === null) {
        // The browser never says why a connection failed (its console may).
        log(this, `Connection failed: the WebSocket did not open (code ${event.code}, wasClean ${event.wasClean}; ` +
          `the browser does not say why, its console does)${next}`, "failed");
      } else if (this.closedByUs !== null) {
        log(this, "Connection closed: " + describeClose(this, event, now) + next, "ours");
      } else {
        log(this, "Connection lost: " + describeClose(this, event, now) + next, "lost");
      }
      this.state = "closed";
      if (!wanted) {
        this.row.remove();
        probes.delete(this.index);
      } else if (delay !== null) {
        this.retryAt = now + delay;
        this.retryTimer = setTimeout(() => this.connect(), delay);
      }
    }

    // Closes the connection from this side with Close 1000 and `reason`.
    close(reason) {
      clearTimeout(this.retryTimer);
      if (this.socket === null) {
        this.row.remove();
        probes.delete(this.index);
        return;
      }
      if (this.socket.readyState === WebSocket.OPEN) {
        this.closedByUs = { code: 1000, reason };
      }
      this.state = "closing";
      this.socket.close(1000, reason);
    }

    // After the reconnect switch changed: a closed connection starts again, or stops waiting.
    resume() {
      if (this.socket !== null) {
        return;
      }
      if (settings.reconnect && this.retryTimer === null) {
        this.connect();
      } else if (!settings.reconnect && this.retryTimer !== null) {
        clearTimeout(this.retryTimer);
        this.retryTimer = null;
        this.retryAt = null;
      }
    }

    stateText(now) {
      if (this.state === "closed" && this.retryAt !== null) {
        return `closed, reconnecting in ${seconds(Math.max(0, this.retryAt - now))}`;
      }
      if (this.state === "open" && settings.silent) {
        return "open, silent";
      }
      return this.state;
    }

    render(now) {
      const cells = this.cells;
      const open = this.state === "open";
      this.row.className = "state-" + this.state;
      cells.state.textContent = this.stateText(now);
      cells.backend.textContent = this.backend;
      cells.uptime.textContent = open ? uptime(now - this.openedAt) : "–";
      cells.reconnects.textContent = String(Math.max(0, this.opens - 1));
      cells.silent.textContent = open ? seconds(now - this.lastHeard) : "–";
      cells.echoes.textContent = String(this.echoes);
      cells.rtt.textContent = millis(this.lastRtt);
      cells.p50.textContent = millis(percentile(this.samples, 0.5));
      cells.p99.textContent = millis(percentile(this.samples, 0.99));
      drawSparkline(cells.spark, this.samples);
    }
  }

  // ---- the table ----

  const COLUMNS = ["index", "state", "backend", "uptime", "reconnects", "silent", "echoes", "rtt", "p50", "p99"];
  const SVG = "http://www.w3.org/2000/svg";

  function makeRow(index) {
    const row = byId("rows").insertRow();
    row.dataset.index = String(index);
    const cells = {};
    for (const name of COLUMNS) {
      const cell = row.insertCell();
      cell.className = name;
      cells[name] = cell;
    }
    cells.index.textContent = String(index);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${SPARK.width} ${SPARK.height}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "spark");
    const line = document.createElementNS(SVG, "polyline");
    svg.append(line);
    const cell = row.insertCell();
    cell.className = "sparkline";
    cell.append(svg);
    cells.spark = line;
    // Rows stay in index order, whatever order they were made in.
    const rows = [...byId("rows").rows];
    rows.sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index));
    byId("rows").append(...rows);
    return [row, cells];
  }

  // Oldest at the left; the line fills the width once SPARK.slots samples have come.
  function drawSparkline(line, samples) {
    const top = Math.max(...samples, 0.001);
    const step = SPARK.width / (Math.max(samples.length, SPARK.slots) - 1);
    const points = samples.map((rtt, i) => {
      const y = SPARK.height - 1 - (rtt / top) * (SPARK.height - 2);
      return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
    });
    line.setAttribute("points", points.join(" "));
  }

  // ---- all connections ----

  const probes = new Map();

  // Opens or closes connections until `settings.connections` are held.
  function holdConnections() {
    for (let index = 1; index <= settings.connections; index += 1) {
      if (!probes.has(index)) {
        const probe = new Probe(index);
        probes.set(index, probe);
        probe.connect();
      } else {
        probes.get(index).resume();
      }
    }
    for (const probe of probes.values()) {
      if (probe.index > settings.connections && probe.state !== "closing") {
        probe.close("fewer connections");
      }
    }
  }

  function renderSummary(now) {
    const all = [...probes.values()].filter((probe) => probe.index <= settings.connections);
    const open = all.filter((probe) => probe.state === "open").length;
    const state = open === all.length ? "open" : open > 0 ? "partly open" : all.some((p) => p.state === "connecting") ? "connecting" : "closed";
    const summary = byId("summary-state");
    summary.textContent = `${state} (${open} of ${all.length})`;
    summary.className = "state-" + state.replace(" ", "-");
    const backends = [...new Set(all.map((probe) => probe.backend).filter((name) => name !== "–"))];
    byId("summary-backends").textContent = backends.length ? backends.join(", ") : "–";
    byId("summary-reconnects").textContent = String(all.reduce((sum, p) => sum + Math.max(0, p.opens - 1), 0));
    const samples = all.flatMap((probe) => probe.samples);
    byId("summary-p50").textContent = millis(percentile(samples, 0.5));
    byId("summary-p99").textContent = millis(percentile(samples, 0.99));
    const oldest = Math.min(...all.filter((p) => p.state === "open").map((p) => p.openedAt));
    byId("summary-uptime").textContent = Number.isFinite(oldest) ? uptime(now - oldest) : "–";
  }

  function render() {
    const now = performance.now();
    for (const probe of probes.values()) {
      probe.render(now);
    }
    renderSummary(now);
  }

  // ---- start ----

  function onChange(event) {
    const input = event.target;
    const name = input.id;
    if (name in SWITCHES) {
      settings[name] = input.checked;
    } else {
      const [min, max, fallback] = LIMITS[name];
      const value = Number(input.value);
      settings[name] = Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : fallback;
      if (name !== "rate") {
        settings[name] = Math.round(settings[name]);
      }
      input.value = String(settings[name]);
    }
    rememberSettings();
    if (name === "connections" || name === "reconnect") {
      holdConnections();
    }
    for (const probe of probes.values()) {
      probe.schedule();
    }
    render();
  }

  byId("no-script").hidden = true;
  byId("target").textContent = socketUrl();
  showSettings();
  for (const input of byId("controls").querySelectorAll("input")) {
    input.addEventListener("change", onChange);
  }
  holdConnections();
  render();
  setInterval(render, RENDER_EVERY_MS);
})();
