// Drawing pad: records strokes as the Quick, Draw! dataset does ([[x...], [y...], [t...]] per
// stroke, t in ms since the drawing started) and asks /predict after each stroke and, throttled,
// while a stroke is being drawn.
"use strict";

(() => {
  const THROTTLE_MS = 250;
  const TOP_K = 5;

  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  const undoButton = document.getElementById("undo");
  const clearButton = document.getElementById("clear");
  const list = document.getElementById("predictions");
  const notSure = document.getElementById("not-sure");
  const placeholder = document.getElementById("placeholder");
  const status = document.getElementById("status");

  let strokes = [];      // finished strokes
  let current = null;    // the stroke being drawn, or null
  let pointerId = null;  // the pointer drawing it (a second finger is ignored)
  let startTime = null;  // event.timeStamp (performance.now() clock) of the drawing's first point
  let lastAsked = 0;     // when /predict was last asked
  let timer = null;      // pending throttled ask
  let asked = 0;         // number of the latest ask; older answers are dropped
  let inkWidth = 4;

  function fitCanvas() {
    // Backing store in device pixels for crisp lines; drawing happens in CSS pixels.
    const box = canvas.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(box.width * ratio);
    canvas.height = Math.round(box.height * ratio);
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    inkWidth = Math.max(3, box.width / 80);
    redraw();
  }

  function strokePath(stroke) {
    const [xs, ys] = stroke;
    ctx.beginPath();
    ctx.moveTo(xs[0], ys[0]);
    // a single point still shows as a dot
    for (let i = 0; i < xs.length; i++) ctx.lineTo(xs[i] + (xs.length === 1 ? 0.01 : 0), ys[i]);
    ctx.stroke();
  }

  function redraw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = inkWidth;
    ctx.strokeStyle = "#1d2330";
    for (const stroke of strokes) strokePath(stroke);
    if (current) strokePath(current);
  }

  function addPoint(event) {
    const box = canvas.getBoundingClientRect();
    const x = Math.round((event.clientX - box.left) * 100) / 100;
    const y = Math.round((event.clientY - box.top) * 100) / 100;
    const [xs, ys, ts] = current;
    const n = xs.length;
    if (n && xs[n - 1] === x && ys[n - 1] === y) return;
    xs.push(x);
    ys.push(y);
    ts.push(Math.max(0, Math.round(event.timeStamp - startTime)));  // the sample's own time, not the handler's
    if (n) {  // extend the line by one segment instead of redrawing everything
      ctx.beginPath();
      ctx.moveTo(xs[n - 1], ys[n - 1]);
      ctx.lineTo(x, y);
      ctx.stroke();
    }
  }

  function onDown(event) {
    if (current || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    pointerId = event.pointerId;
    if (startTime === null) startTime = event.timeStamp;
    current = [[], [], []];
    addPoint(event);
    redraw();
  }

  function onMove(event) {
    if (!current || event.pointerId !== pointerId) return;
    event.preventDefault();
    // Coalesced events keep every sampled point of a fast stroke, as the dataset's recorder did.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) addPoint(e);
    askSoon();
  }

  function onUp(event) {
    if (!current || event.pointerId !== pointerId) return;
    addPoint(event);
    strokes.push(current);
    current = null;
    pointerId = null;
    changed();
  }

  function drawingNow() {
    return current && current[0].length ? [...strokes, current] : strokes;
  }

  function askSoon() {
    const wait = THROTTLE_MS - (performance.now() - lastAsked);
    if (wait <= 0) ask();
    else if (!timer) timer = setTimeout(ask, wait);
  }

  async function ask() {
    clearTimeout(timer);
    timer = null;
    const drawing = drawingNow();
    if (!drawing.length) return;
    lastAsked = performance.now();
    const mine = ++asked;
    try {
      const response = await fetch("/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ strokes: drawing, top_k: TOP_K }),
      });
      const answer = await response.json();
      if (mine !== asked) return;  // a newer drawing was sent meanwhile
      if (!response.ok) throw new Error(answer.detail || response.statusText);
      show(answer.predictions, answer.unsure);
      status.textContent = "";
    } catch (error) {
      if (mine === asked) status.textContent = `Could not get a guess: ${error.message}`;
    }
  }

  // unsure: the top probability is below the service's threshold (answer.unsure_below). The guesses are
  // then listed as guesses, without bars, under a "not sure" line.
  function show(predictions, unsure) {
    notSure.hidden = !unsure;
    list.classList.toggle("unsure", Boolean(unsure));
    list.replaceChildren(...predictions.map(({ label, probability }) => {
      const percent = (100 * probability).toFixed(1) + "%";
      const item = document.createElement("li");
      item.setAttribute("aria-label", `${label}: ${percent}`);
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      name.title = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = percent;
      bar.append(fill);
      const value = document.createElement("span");
      value.className = "percent";
      value.textContent = percent;
      item.append(...(unsure ? [name, value] : [name, bar, value]));
      return item;
    }));
    placeholder.hidden = predictions.length > 0;
  }

  function changed() {
    canvas.dataset.strokes = String(strokes.length);
    undoButton.disabled = clearButton.disabled = strokes.length === 0;
    redraw();
    if (strokes.length) {
      ask();
    } else {
      asked++;  // drop any answer still on its way
      startTime = null;
      show([]);
      status.textContent = "";
    }
  }

  function undo() {
    if (current) return;
    strokes.pop();
    changed();
  }

  function clear() {
    if (current) return;
    strokes = [];
    changed();
  }

  async function loadInfo() {
    try {
      const [health, known] = await Promise.all(
        ["/health", "/classes"].map((url) => fetch(url).then((r) => r.json())));
      document.getElementById("model").textContent = `${health.model} (${health.classes} classes)`;
      document.getElementById("classes").textContent = known.classes.join(", ");
    } catch (error) {
      status.textContent = `The server does not answer: ${error.message}`;
    }
  }

  canvas.addEventListener("pointerdown", onDown);
  canvas.addEventListener("pointermove", onMove);
  canvas.addEventListener("pointerup", onUp);
  canvas.addEventListener("pointercancel", onUp);
  undoButton.addEventListener("click", undo);
  clearButton.addEventListener("click", clear);
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    } else if (event.key === "Escape") {
      clear();
    }
  });
  window.addEventListener("resize", fitCanvas);
  fitCanvas();
  loadInfo();
})();
