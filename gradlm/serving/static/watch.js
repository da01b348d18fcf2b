/* gradlm watch: the page's script. It listens to /events (server-sent events; the protocol is in
   gradlm/serving/watch.py's docstring), keeps every run's rows, and draws them with uPlot. Model text and file
   contents are untrusted: they reach the page through textContent only, never innerHTML. */
(() => {
  'use strict';

  // matplotlib's default cycle: the same colour per run as compare.png
  const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f'];
  const EVENT_COLORS = { diverged: '#c62828', overfitting: '#ef6c00', variance: '#f9a825', converged: '#2e7d32', resumed: '#1565c0', budget_extended: '#6a1b9a', stopped: '#546e7a' };
  const OTHER_EVENT = '#8d8d86';
  const X_LABELS = { step: 'step', tokens: 'tokens seen', time: 'wall time' };
  const REASONS = {
    budget: 'its budget ran out',
    converged: 'it converged (early stopping)',
    paused: 'paused (--pause-at); train again with --resume to go on',
    interrupted: 'interrupted; train again with --resume to go on',
    diverged: 'it diverged and the guard gave up',
  };
  const STALE_S = 120; // a running run with no new row for this long gets a "no news" hint

  const key = new URLSearchParams(location.search).get('key');
  const $ = (id) => document.getElementById(id);

  const S = {
    runs: new Map(), // id -> run
    order: [], // run ids, in the server's order
    groups: new Map(), // id -> {name, path, compare}
    sources: [],
    x: 'step',
    logY: false,
    selected: null, // path of the run in the detail panel
    hidden: new Set(), // paths of runs hidden from the charts (paths survive a reconnect; ids need not)
    skew: 0, // server clock - page clock, seconds
    conn: 'connecting',
    renders: 0,
  };
  const dirty = new Set();
  const charts = {}; // chart id -> {u, specs, signature}

  // ---- formatting ----------------------------------------------------------------------------------------
  const nf = new Intl.NumberFormat('en');
  const num = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmtInt = (v) => (num(v) ? nf.format(Math.round(v)) : '–');
  function fmtCompact(v) {
    if (!num(v)) return '–';
    const a = Math.abs(v);
    for (const [d, s] of [[1e12, 'T'], [1e9, 'B'], [1e6, 'M'], [1e3, 'k']]) if (a >= d) return +(v / d).toPrecision(3) + s;
    return String(+v.toPrecision(3));
  }
  function fmtDur(s) {
    if (!num(s)) return '–';
    s = Math.max(0, s);
    if (s < 60) return (s < 10 ? +s.toFixed(1) : Math.round(s)) + 's';
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m${String(Math.floor(s % 60)).padStart(2, '0')}s`;
    const h = Math.floor(m / 60);
    return h < 48 ? `${h}h${String(m % 60).padStart(2, '0')}m` : `${Math.floor(h / 24)}d${h % 24}h`;
  }
  function fmtNum(v, digits = 4) {
    if (!num(v)) return '–';
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
    return String(+v.toFixed(digits));
  }
  const fmtLr = (v) => (num(v) ? (v === 0 ? '0' : v.toExponential(2)) : '–');
  // a log axis labels its powers of ten only (uPlot passes null for the splits it leaves unlabelled)
  const fmtPow10 = (v) => (num(v) && v > 0 && Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-6 ? `1e${Math.round(Math.log10(v))}` : '');
  const fmtX = (v) => (S.x === 'time' ? fmtDur(v) : S.x === 'tokens' ? fmtCompact(v) : Math.abs(v) >= 1e5 ? fmtCompact(v) : fmtInt(v));
  function fmtTick(v) {
    if (!num(v) || v === 0) return num(v) ? '0' : '';
    const a = Math.abs(v);
    return a < 1e-2 ? v.toExponential(1) : a >= 1e4 ? fmtCompact(v) : String(+v.toPrecision(4));
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  const color = (run) => PALETTE[run.color % PALETTE.length];
  const eventColor = (kind) => EVENT_COLORS[kind] || OTHER_EVENT;

  // ---- the data ------------------------------------------------------------------------------------------
  function newRun(info) {
    return {
      ...info, config: null, summary: null, lrResult: null, status: { state: 'waiting' },
      steps: [], evals: [], events: [], samples: [], lrRows: [], lrKeys: [], seq: 0,
    };
  }
  const runList = () => S.order.map((id) => S.runs.get(id));
  const trainingRuns = () => runList().filter((r) => r.kind !== 'lr_find');
  const lrRuns = () => runList().filter((r) => r.kind === 'lr_find');
  const shown = (run) => !S.hidden.has(run.path);
  const selectedRun = () => runList().find((r) => r.path === S.selected) || runList()[0] || null;
  let eventSeq = 0;

  function clearFile(run, file) {
    if (file === 'metrics') Object.assign(run, { steps: [], evals: [], events: [], lrKeys: [] });
    else if (file === 'samples') run.samples = [];
    else if (file === 'lr_find') run.lrRows = [];
  }

  function addMetrics(run, rows) {
    for (const r of rows) {
      if (r.event != null) {
        const last = run.steps[run.steps.length - 1];
        // older events (e.g. "diverged") carry only their step: place them with the last step row on other axes
        if (r.tokens == null && last) r.tokens = last.tokens;
        if (r.time == null && last) r.time = last.time;
        r.seq = ++eventSeq;
        run.events.push(r);
        dirty.add('events');
      } else if ('val_loss' in r || 'val_bpb' in r) {  // an evaluation, even one whose loss was not finite (null)
        run.evals.push(r);
      } else if (r.loss !== undefined || r.lr !== undefined) {
        run.steps.push(r);
        for (const k of Object.keys(r)) if (/^lr($|_)/.test(k) && !run.lrKeys.includes(k)) run.lrKeys.push(k);
      }
    }
  }

  function handle(name, d) {
    if (name === 'hello') {
      S.runs.clear();
      S.order = [];
      S.groups.clear();
      S.sources = d.sources || [];
      S.skew = (d.now || Date.now() / 1000) - Date.now() / 1000;
      markAll();
      return;
    }
    if (name === 'runs') {
      const next = new Map();
      for (const info of d.runs) {
        const had = S.runs.get(info.id);
        next.set(info.id, had && had.path === info.path ? Object.assign(had, info) : newRun(info));
      }
      S.runs = next;
      S.order = d.runs.map((r) => r.id);
      const groups = new Map();
      for (const g of d.groups || []) groups.set(g.id, { ...g, compare: (S.groups.get(g.id) || {}).compare || null });
      S.groups = groups;
      markAll();
      return;
    }
    if (d.group != null) {
      const g = S.groups.get(d.group);
      if (g) g.compare = d.data;
      dirty.add('compare');
      return;
    }
    const run = S.runs.get(d.run);
    if (!run) return;
    if (name === 'file') {
      if (d.file === 'config') run.config = d.data;
      else if (d.file === 'summary') run.summary = d.data;
      else if (d.file === 'lr_find') run.lrResult = d.data;
      dirty.add('detail').add('lrfind');
    } else if (name === 'reset') {
      clearFile(run, d.file);
      dirty.add('charts').add('events').add('samples').add('detail').add('lrfind').add('list');
    } else if (name === 'rows') {
      if (d.file === 'metrics') addMetrics(run, d.rows);
      else if (d.file === 'samples') run.samples.push(...d.rows);
      else if (d.file === 'lr_find') run.lrRows.push(...d.rows);
      dirty.add(d.file === 'samples' ? 'samples' : d.file === 'lr_find' ? 'lrfind' : 'charts').add('detail').add('list');
    } else if (name === 'status') {
      run.status = d;
      dirty.add('detail').add('list');
    }
  }
  function markAll() {
    for (const k of ['list', 'detail', 'samples', 'events', 'charts', 'lrfind', 'compare', 'title']) dirty.add(k);
  }

  // ---- rendering, at most every RENDER_MS ----------------------------------------------------------------
  const RENDER_MS = 200;
  let scheduled = false;
  let lastRender = 0;
  function schedule() {
    if (scheduled || !dirty.size) return;
    scheduled = true;
    setTimeout(() => requestAnimationFrame(render), Math.max(0, RENDER_MS - (performance.now() - lastRender)));
  }
  function render() {
    scheduled = false;
    lastRender = performance.now();
    const todo = new Set(dirty);
    dirty.clear();
    if (todo.has('title')) renderTitle();
    if (todo.has('list')) renderList();
    if (todo.has('detail')) renderDetail();
    if (todo.has('samples')) renderSamples();
    if (todo.has('events')) renderEvents();
    if (todo.has('charts')) renderCharts();
    if (todo.has('lrfind')) renderLrFind();
    if (todo.has('compare')) renderCompare();
    S.renders++;
  }

  function renderTitle() {
    const runs = runList();
    const groups = [...S.groups.values()];
    const text = groups.length === 1 && runs.every((r) => r.group === groups[0].id) ? `${groups[0].name}: ${runs.length} runs compared`
      : runs.length === 1 ? runs[0].name : runs.length ? `${runs.length} runs` : '';
    $('title').textContent = text;
    document.title = text ? `${text} · gradlm watch` : 'gradlm watch';
    $('training').hidden = runs.length > 0 && !trainingRuns().length;
    for (const control of document.querySelectorAll('.train-only')) control.hidden = $('training').hidden; // the lr-find chart has its own x
  }

  function latestStep(run) {  // step rows come every --log-every steps; evaluations and events (the stop) may be later
    return Math.max(0, ...[run.steps.at(-1), run.evals.at(-1), run.events.at(-1)].filter(Boolean).map((r) => r.step ?? 0));
  }

  function stateLine(run) {
    const st = run.status || {};
    const last = run.steps[run.steps.length - 1];
    const lastEval = run.evals[run.evals.length - 1];
    if (run.kind === 'lr_find') return st.state === 'finished' ? 'finished' : st.state === 'running' ? `sweeping · ${run.lrRows.length} steps` : 'waiting for the sweep to start';
    const parts = [st.state === 'waiting' ? 'waiting' : st.state || 'waiting'];
    if (last) parts.push(`step ${fmtInt(latestStep(run))}`);
    if (lastEval && num(lastEval.val_loss)) parts.push(`val ${fmtNum(lastEval.val_loss)}`);
    return parts.join(' · ');
  }

  let listKey = '';
  function renderList() {
    const box = $('runs');
    const runs = runList();
    // Rebuild the controls only when what they offer changed: a rebuild under the pointer loses a click, and
    // one under an open drop-down replaces its options. Otherwise only the state lines change, in place.
    const key = runs.map((r) => `${r.path}|${shown(r)}|${r.name}`).join('\n') + '\n' + (selectedRun() || {}).path;
    if (key === listKey) {
      runs.forEach((run, i) => { const st = box.children[i] && box.children[i].querySelector('.state'); if (st) st.textContent = stateLine(run); });
      return;
    }
    listKey = key;
    box.replaceChildren();
    for (const run of runs) {
      const item = el('label', 'run' + (shown(run) ? '' : ' off') + (selectedRun() === run ? ' selected' : ''));
      item.dataset.run = run.name;
      const check = el('input');
      check.type = 'checkbox';
      check.checked = shown(run);
      check.title = 'show on the charts';
      check.addEventListener('change', () => {
        if (check.checked) S.hidden.delete(run.path);
        else S.hidden.add(run.path);
        dirty.add('charts').add('lrfind').add('list');
        schedule();
      });
      const swatch = el('span', 'swatch');
      swatch.style.background = color(run);
      const name = el('span', 'name', run.name);
      name.title = run.path;
      name.addEventListener('click', (e) => { e.preventDefault(); select(run.path); });
      item.append(check, swatch, name, el('span', 'state', stateLine(run)));
      box.append(item);
    }
    const pick = $('run-select');
    pick.hidden = runs.length < 2;
    const options = runs.map((r) => { const o = el('option', null, r.name); o.value = r.path; return o; });
    pick.replaceChildren(...options);
    const sel = selectedRun();
    if (sel) pick.value = sel.path;
  }

  function select(path) {
    S.selected = path;
    dirty.add('detail').add('samples').add('list');
    schedule();
  }

  function reasonText(reason) {
    return reason ? REASONS[reason] || reason : '';
  }

  function renderDetail() {
    const run = selectedRun();
    const status = $('status');
    status.replaceChildren();
    $('progress').hidden = true;
    $('best').hidden = true;
    $('final').hidden = true;
    $('settings').replaceChildren();
    if (!run) {
      status.textContent = S.conn === 'live' ? 'nothing to show yet' : 'connecting…';
      return;
    }
    const st = run.status || { state: 'waiting' };
    status.dataset.state = st.state;
    let head;
    const last = run.steps[run.steps.length - 1];
    if (st.state === 'waiting') head = run.kind === 'lr_find' ? 'waiting for the sweep to start' : 'waiting for the run to start';
    else if (st.state === 'starting') head = 'starting: preparing the data and the model';
    else if (st.state === 'running') head = run.kind === 'lr_find' ? 'sweeping learning rates' : `running · step ${fmtInt(latestStep(run))}`;
    else head = 'finished' + (st.reason ? `: ${reasonText(st.reason)}` : '');
    status.append(document.createTextNode(head));
    const why = [];
    if (st.state === 'finished' && st.message) why.push(st.message);
    if (st.state === 'running' && num(st.updated)) {
      const age = Date.now() / 1000 + S.skew - st.updated;
      if (age > STALE_S) why.push(`no new rows for ${fmtDur(age)}: has training stopped?`);
    }
    if (why.length) status.append(el('span', 'why', why.join(' ')));

    if (run.kind === 'lr_find') {
      addSettings(run.lrResult && run.lrResult.optimizer ? [['optimizer', run.lrResult.optimizer]] : []);
      return;
    }
    if (st.state === 'running' || st.state === 'starting') renderProgress(run, last);
    const best = [...run.evals].reverse().find((r) => r.best === true);
    if (best) {
      $('best').hidden = false;
      $('best').textContent = `best checkpoint: step ${fmtInt(best.step)}, val loss ${fmtNum(best.val_loss)}` + (num(best.val_bpb) ? `, ${fmtNum(best.val_bpb)} bits/byte` : '');
    }
    if (st.state === 'finished' && run.summary) renderFinal(run.summary);
    addSettings(settingsRows(run.config || {}, run.summary));
  }

  function renderProgress(run, last) {
    const t = (run.config || {}).train || {};
    let progress = last && num(last.progress) ? last.progress : null;
    if (progress == null && last && num(t.max_steps) && t.max_steps > 0) progress = last.step / t.max_steps;
    if (progress == null) return;
    progress = Math.min(1, Math.max(0, progress));
    $('progress').hidden = false;
    $('progress').querySelector('.fill').style.width = `${(100 * progress).toFixed(1)}%`;
    $('eta').textContent = `${Math.floor(100 * progress)}%` + (last && num(last.eta_s) ? ` · ${fmtDur(last.eta_s)} left` : '');
  }

  function renderFinal(s) {
    const rows = [
      ['steps', fmtInt(s.steps)], ['tokens', fmtInt(s.tokens)], ['time', fmtDur(s.time_s)],
      ['val loss', fmtNum(s.val_loss)], ['val bits/byte', fmtNum(s.val_bpb)], ['best val loss', fmtNum(s.best_val_loss)],
      ['throughput', num(s.tokens_per_s) ? `${fmtCompact(s.tokens_per_s)} tokens/s` : '–'],
    ];
    if (num(s.divergence_restarts) && s.divergence_restarts > 0) rows.push(['divergence restarts', fmtInt(s.divergence_restarts)]);
    fillDl($('final'), rows.filter(([, v]) => v !== '–'));
    $('final').hidden = false;
  }

  function fillDl(dl, rows) {
    dl.replaceChildren();
    for (const [k, v] of rows) dl.append(el('dt', null, k), el('dd', null, v));
  }
  const addSettings = (rows) => fillDl($('settings'), rows);
  const parts = (...xs) => xs.filter((x) => x != null && x !== '' && x !== false).join(', ');

  function settingsRows(cfg, summary) {
    const m = cfg.model || {};
    const t = cfg.train || {};
    const d = cfg.data || {};
    const rows = [];
    const width = m.d_model ?? m.n_embd;
    if (m.n_layer != null) {
      const kv = m.n_kv_head != null && m.n_kv_head !== m.n_head ? ` (${m.n_kv_head} key/value)` : '';
      rows.push(['model', parts(`${m.n_layer} layer${m.n_layer === 1 ? '' : 's'} × ${width} wide`, m.n_head != null && `${m.n_head} heads${kv}`, m.block_size != null && `context ${fmtInt(m.block_size)}`, m.vocab_size != null && `vocab ${fmtInt(m.vocab_size)}`)]);
    }
    const params = cfg.params ?? (summary || {}).params;
    if (num(params)) rows.push(['parameters', fmtInt(params)]);
    if (t.optimizer) rows.push(['optimizer', parts(t.optimizer, t.optimizer === 'muon' && num(t.muon_lr) && `muon lr ${fmtLr(t.muon_lr)}`, num(t.weight_decay) && `weight decay ${t.weight_decay}`)]);
    if (t.lr != null) rows.push(['learning rate', parts(fmtLr(t.lr), t.schedule && `${t.schedule} schedule`, num(t.warmup_steps) && `${fmtInt(t.warmup_steps)} warmup steps`)]);
    if (t.batch != null) {
      const tokens = num(t.batch) && num(m.block_size) ? ` = ${fmtInt(t.batch * m.block_size)} tokens` : '';
      rows.push(['batch', parts(`${t.batch} × ${m.block_size ?? '?'}${tokens}`, num(t.accum) && t.accum > 1 && `${t.accum} accumulation steps`)]);
    }
    const budget = parts(num(t.max_steps) && t.max_steps > 0 && `${fmtInt(t.max_steps)} steps`, num(t.max_tokens) && t.max_tokens > 0 && `${fmtCompact(t.max_tokens)} tokens`,
      t.max_time && `${t.max_time}${num(t.max_time) ? ' s' : ''}`, num(t.max_epochs) && t.max_epochs > 0 && `${t.max_epochs} epochs`);
    if (cfg.train) rows.push(['budget', budget || 'none: until stopped']);
    if (num(t.eval_every) && t.eval_every > 0) rows.push(['evaluation', parts(`every ${fmtInt(t.eval_every)} steps`, num(t.patience) && t.patience > 0 && `patience ${t.patience}`)]);
    if (num(m.dropout) && m.dropout > 0) rows.push(['dropout', String(m.dropout)]);
    const rt = cfg.runtime || {};  // what --device/--dtype auto resolved to on the training machine
    const dtype = rt.dtype || (summary && summary.dtype) || t.dtype;
    const device = rt.device || (t.device === 'auto' ? 'auto-detected' : t.device);
    if (device || dtype) rows.push(['device', parts(device, dtype !== 'auto' && dtype)]);
    if (t.data || d.train_tokens != null) {
      const tokens = num(d.train_tokens) ? `${fmtCompact(d.train_tokens)} train + ${fmtCompact(d.val_tokens)} val tokens` : null;
      rows.push(['data', parts(typeof t.data === 'string' ? t.data.split('/').filter(Boolean).pop() : null, tokens)]);
    }
    if (t.seed != null) rows.push(['seed', String(t.seed)]);
    if (cfg.size && cfg.size.reason) rows.push(['size (auto)', cfg.size.reason]);
    if (cfg.finetune && typeof cfg.finetune === 'object') {
      rows.push(['fine-tune', Object.entries(cfg.finetune).filter(([, v]) => v != null && typeof v !== 'object').map(([k, v]) => `${k} ${v}`).join(', ')]);
    }
    return rows;
  }

  function renderSamples() {
    const box = $('samples');
    const run = selectedRun();
    const top = box.scrollTop;  // a reader scrolled down to an older sample stays there when a new one arrives
    box.replaceChildren();
    const samples = run ? run.samples : [];
    if (!samples.length) {
      box.append(el('li', 'empty-note', run && run.kind === 'lr_find' ? 'an lr-find sweep writes no samples' : 'none yet: training writes one at each evaluation'));
      return;
    }
    for (let i = samples.length - 1; i >= 0; i--) {
      const s = samples[i];
      const li = el('li', 'sample');
      li.append(el('div', 'meta', [s.step != null && `step ${fmtInt(s.step)}`, num(s.tokens) && `${fmtCompact(s.tokens)} tokens`, num(s.time) && fmtDur(s.time)].filter(Boolean).join(' · ')));
      const body = el('div', 'body');
      body.append(el('span', 'prompt', s.prompt ?? ''), el('span', 'text', s.text ?? ''));
      li.append(body);
      box.append(li);
    }
    box.scrollTop = top;
  }

  function eventMessage(ev) {
    if (ev.message) return ev.message;
    if (ev.event === 'diverged') {
      return parts(num(ev.loss) ? `loss ${fmtNum(ev.loss)}` : 'the loss was not finite', ev.at_step != null && `at step ${fmtInt(ev.at_step)}`) + '; restored an earlier state' + (num(ev.new_lr) ? `, learning rate now ${fmtLr(ev.new_lr)}` : '');
    }
    if (ev.event === 'stopped' && ev.reason) return reasonText(ev.reason);
    return '';
  }

  function renderEvents() {
    const box = $('events');
    box.replaceChildren();
    const several = trainingRuns().length > 1;
    const all = trainingRuns().flatMap((run) => run.events.map((ev) => [run, ev])).sort((a, b) => b[1].seq - a[1].seq);
    if (!all.length) {
      box.append(el('li', 'empty-note', 'none so far: divergence, growing variance, overfitting, convergence, resumes and the stop appear here'));
      return;
    }
    for (const [run, ev] of all) {
      const li = el('li', 'event');
      li.dataset.kind = ev.event;
      const kind = el('span', 'kind', String(ev.event).replace(/_/g, ' '));
      kind.style.background = eventColor(ev.event);
      const where = [several && run.name, ev.step != null && `step ${fmtInt(ev.step)}`, num(ev.time) && fmtDur(ev.time)].filter(Boolean).join(' · ');
      li.append(kind, el('span', 'where', where), el('span', 'message', eventMessage(ev)));
      box.append(li);
    }
  }

  // ---- charts ----------------------------------------------------------------------------------------------
  const CHARTS = [
    { id: 'loss', y: 'loss (nats/token)', height: 220, best: 'val_loss', series: () => [{ key: 'loss', label: 'train', src: 'steps' }, { key: 'val_loss', label: 'val', src: 'evals', points: true, dash: [5, 4] }] },
    { id: 'bpb', y: 'bits per byte', height: 150, best: 'val_bpb', series: () => [{ key: 'val_bpb', src: 'evals', points: true }] },
    { id: 'lr', y: 'learning rate', height: 150, exp: true, series: (run) => run.lrKeys.map((k, i) => ({ key: k, label: k, src: 'steps', dash: i ? [6, 4] : undefined })) },
    { id: 'grad', y: 'gradient norm', height: 150, series: () => [{ key: 'grad_norm', src: 'steps' }] },
    { id: 'tps', y: 'tokens / s', height: 150, series: () => [{ key: 'tokens_per_s', src: 'steps' }] },
  ];

  // Series of several runs share one x array (uPlot's aligned data): the union of their x values, each
  // series null where it has no point (lines span the gaps). A repeated x (steps trained again after the
  // divergence guard restored an earlier state) keeps its latest value; the wall-time axis shows both.
  function align(specs, xOf) {
    const maps = specs.map((sp) => {
      const m = new Map();
      for (const r of sp.rows) {
        const x = xOf(r);
        const y = r[sp.key];
        if (!num(x) || !num(y) || (sp.log && y <= 0)) continue;
        m.set(x, y);
      }
      return m;
    });
    const xs = new Set();
    for (const m of maps) for (const x of m.keys()) xs.add(x);
    const xarr = Float64Array.from(xs).sort();
    return [Array.from(xarr), ...maps.map((m) => Array.from(xarr, (x) => (m.has(x) ? m.get(x) : null)))];
  }

  function drawMarks(u, def, runs) {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const dpr = devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    for (const run of runs) {
      for (const ev of run.events) {
        const x = S.x === 'step' ? ev.at_step ?? ev.step : S.x === 'tokens' ? ev.at_tokens ?? ev.tokens : ev[S.x];  // a restore: where it diverged
        if (!num(x)) continue;
        const px = u.valToPos(x, 'x', true);
        if (px < left - 1 || px > left + width + 1) continue;
        ctx.strokeStyle = ctx.fillStyle = eventColor(ev.event);
        ctx.lineWidth = 1.5 * dpr;
        ctx.setLineDash([5 * dpr, 4 * dpr]);
        ctx.beginPath();
        ctx.moveTo(px, top);
        ctx.lineTo(px, top + height);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.beginPath(); // a small flag at the top says which kind at a glance
        ctx.moveTo(px - 5 * dpr, top);
        ctx.lineTo(px + 5 * dpr, top);
        ctx.lineTo(px, top + 7 * dpr);
        ctx.fill();
      }
    }
    ctx.restore();
    if (!def.best) return;
    ctx.save();
    for (const run of runs) { // the best checkpoint: a ring on the last evaluation that wrote best.safetensors
      const best = [...run.evals].reverse().find((r) => r.best === true);
      if (!best || !num(best[def.best]) || !num(best[S.x])) continue;
      const px = u.valToPos(best[S.x], 'x', true);
      const py = u.valToPos(best[def.best], 'y', true);
      if (px < left - 1 || px > left + width + 1) continue;
      ctx.lineWidth = 2 * dpr;
      ctx.strokeStyle = color(run);
      ctx.fillStyle = '#fff';
      ctx.beginPath();
      ctx.arc(px, py, 6 * dpr, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = color(run);
      ctx.font = `${11 * dpr}px system-ui, sans-serif`;
      if (runs.length > 1) continue; // several rings: labels would overlap; the caption says what a ring is
      ctx.textAlign = px > left + width - 20 * dpr ? 'right' : 'center'; // at the right edge: the label stays inside
      ctx.fillText('best', px, py - 9 * dpr);
    }
    ctx.restore();
  }

  function axis(label, values) {
    return { label, values, stroke: '#55554f', grid: { stroke: '#ececE6', width: 1 }, ticks: { stroke: '#d8d8d2', width: 1 }, labelSize: 18, labelFont: '12px system-ui, sans-serif', font: '11px system-ui, sans-serif' };
  }

  function plotBox(id) {
    return $('chart-' + id).querySelector('.plot');
  }

  function setChart(id, specs, data, makeOpts) {
    const box = plotBox(id);
    const signature = [S.x, S.logY, ...specs.map((s) => `${s.run.id}:${s.run.name}:${s.key}`)].join('|');
    const c = charts[id];
    if (!specs.length) {
      if (c) c.u.destroy();
      delete charts[id];
      box.replaceChildren(el('div', 'empty', 'no points yet'));
      return;
    }
    if (c && c.signature === signature) {
      c.specs = specs;
      if (!c.zoomed) c.u.setData(data);
      else {  // keep the reader's zoom while new rows arrive (a double-click shows everything again)
        const { min, max } = c.u.scales.x;
        c.u.setData(data, false);
        c.u.setScale('x', { min, max });
      }
      return;
    }
    if (c) c.u.destroy();
    box.replaceChildren();
    const opts = makeOpts(box.clientWidth || 400);
    opts.hooks = { ...(opts.hooks || {}), setSelect: [(u) => { if (u.select.width > 0 && charts[id]) charts[id].zoomed = true; }] };
    const u = new uPlot(opts, data, box);
    u.over.addEventListener('dblclick', () => { if (charts[id]) charts[id].zoomed = false; });
    charts[id] = { u, specs, signature, zoomed: false };
  }

  function renderCharts() {
    const runs = trainingRuns().filter(shown);
    for (const def of CHARTS) {
      const specs = [];
      for (const run of runs) for (const s of def.series(run)) specs.push({ ...s, run, rows: run[s.src], log: S.logY });
      const several = runs.length > 1;
      const data = align(specs, (r) => r[S.x]);
      setChart(def.id, specs, data, (width) => ({
        width, height: def.height,
        scales: { x: { time: false }, y: S.logY ? { distr: 3, log: 10 } : {} },
        axes: [axis(X_LABELS[S.x], (u, ticks) => ticks.map(fmtX)), { ...axis(def.y, (u, ticks) => ticks.map(def.exp ? (v) => (v === 0 ? '0' : v.toExponential(1)) : fmtTick)), size: 58 }],
        series: [
          { label: X_LABELS[S.x], value: (u, v) => (v == null ? '–' : fmtX(v)) },
          ...specs.map((sp) => ({
            label: [several && sp.run.name, sp.label].filter(Boolean).join(' ') || sp.run.name,
            stroke: color(sp.run), width: sp.points ? 1.5 : 1.25, dash: sp.dash, spanGaps: true,
            points: sp.points ? { show: true, size: 6, fill: color(sp.run), stroke: color(sp.run) } : {},
            value: (u, v) => (v == null ? '–' : def.exp ? fmtLr(v) : fmtNum(v)),
          })),
        ],
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
        hooks: { draw: [(u) => drawMarks(u, def, trainingRuns().filter(shown))] },
      }));
    }
  }

  function lrFindRows(run) {
    if (run.lrRows.length) return run.lrRows;
    const r = run.lrResult; // a sweep's final file alone (its rows file gone): draw from its arrays
    if (!r || !Array.isArray(r.lrs)) return [];
    return r.lrs.map((lr, i) => ({ lr, loss: (r.losses || [])[i], smoothed: (r.smoothed || [])[i] }));
  }

  function renderLrFind() {
    const runs = lrRuns();
    $('lrfind').hidden = !runs.length;
    if (!runs.length) return;
    const visible = runs.filter(shown);
    const specs = visible.flatMap((run) => [
      { key: 'loss', label: 'loss', run, rows: lrFindRows(run), faint: true },
      { key: 'smoothed', label: 'smoothed', run, rows: lrFindRows(run) },
    ]);
    const data = align(specs.map((s) => ({ ...s, log: false })), (r) => (num(r.lr) && r.lr > 0 ? r.lr : null));
    const several = visible.length > 1;
    setChart('lrfind', specs, data, (width) => ({
      width, height: 300,
      scales: { x: { time: false, distr: 3, log: 10 }, y: { range: (u, lo, hi) => lrRange(lrRuns().filter(shown), lo, hi) } },
      axes: [axis('learning rate (grows exponentially each step)', (u, ticks) => ticks.map(fmtPow10)), { ...axis('training loss', (u, ticks) => ticks.map(fmtTick)), size: 58 }],
      series: [
        { label: 'lr', value: (u, v) => (v == null ? '–' : fmtLr(v)) },
        ...specs.map((sp) => ({
          label: [several && sp.run.name, sp.label].filter(Boolean).join(' '),
          stroke: sp.faint ? color(sp.run) + '66' : color(sp.run), width: sp.faint ? 1 : 2, spanGaps: true,
          value: (u, v) => fmtNum(v),
        })),
      ],
      legend: { live: true },
      hooks: { draw: [(u) => drawSuggestions(u, lrRuns().filter(shown))] },
    }));
    const box = $('lrfind-result');
    box.replaceChildren();
    for (const run of runs) {
      const r = run.lrResult;
      const p = el('p');
      if (runs.length > 1) p.append(el('strong', null, run.name + ': '));
      if (r && num(r.suggested_lr)) {
        p.append(document.createTextNode('suggested learning rate '), el('span', 'lr', fmtLr(r.suggested_lr)));
        const more = [num(r.min_loss_lr) && `lowest loss at ${fmtLr(r.min_loss_lr)}`, r.optimizer && `optimizer ${r.optimizer}`].filter(Boolean).join('; ');
        if (more) p.append(document.createTextNode(` (${more})`));
        if (r.reason) p.append(document.createTextNode(`: ${r.reason}`));
      } else {
        p.append(document.createTextNode(run.status && run.status.state === 'running' ? `sweeping: ${run.lrRows.length} steps so far; the suggestion comes at the end` : 'waiting for the sweep to start'));
      }
      box.append(p);
    }
  }

  // The y range of a range test: from the lowest loss to a little above where it started (the loss blows
  // up at the end of the sweep; showing all of it would flatten the part that matters).
  function lrRange(runs, lo, hi) {
    const sm = runs.flatMap((r) => lrFindRows(r).map((x) => x.smoothed)).filter(num);
    const all = runs.flatMap((r) => lrFindRows(r).flatMap((x) => [x.loss, x.smoothed])).filter(num);
    if (!all.length) return [lo, hi];
    const low = Math.min(...all);
    const start = sm.length ? Math.max(...runs.map((r) => (lrFindRows(r).find((x) => num(x.smoothed)) || {}).smoothed).filter(num)) : Math.max(...all);
    const span = Math.max(start - low, 1e-9);
    return [low - 0.1 * span, Math.min(Math.max(...all), start + 0.5 * span) + 0.02 * span];
  }

  function drawSuggestions(u, runs) {
    const ctx = u.ctx;
    const { top, height } = u.bbox;
    const dpr = devicePixelRatio || 1;
    ctx.save();
    for (const run of runs) {
      const r = run.lrResult;
      if (!r) continue;
      for (const [lr, dash, label, row] of [[r.suggested_lr, [6, 4], 'suggested', 1], [r.min_loss_lr, [2, 3], 'lowest loss', 2]]) {
        if (!num(lr) || lr <= 0) continue;
        const px = u.valToPos(lr, 'x', true);
        ctx.strokeStyle = ctx.fillStyle = label === 'suggested' ? '#c62828' : '#8d8d86';
        ctx.lineWidth = 1.5 * dpr;
        ctx.setLineDash(dash.map((d) => d * dpr));
        ctx.beginPath();
        ctx.moveTo(px, top);
        ctx.lineTo(px, top + height);
        ctx.stroke();
        ctx.font = `${11 * dpr}px system-ui, sans-serif`;
        const text = `${label} ${fmtLr(lr)}`;
        const right = px + 4 * dpr + ctx.measureText(text).width > u.bbox.left + u.bbox.width; // no room on the right: write it on the left
        ctx.textAlign = right ? 'right' : 'left';
        ctx.fillText(text, right ? px - 4 * dpr : px + 4 * dpr, top + 13 * row * dpr);
      }
    }
    ctx.restore();
  }

  function renderCompare() {
    const box = $('compare-tables');
    box.replaceChildren();
    const done = [...S.groups.values()].filter((g) => g.compare && Array.isArray(g.compare.runs));
    $('compare').hidden = !done.length;
    for (const g of done) {
      box.append(el('p', null, `${g.name}: ${g.compare.budget || ''}`));
      const cols = [['label', 'run'], ['status', 'status'], ['val_bpb', 'val bits/byte'], ['val_loss', 'val loss'], ['steps', 'steps'], ['time_s', 'time (s)'], ['warning', 'note']];
      const table = el('table');
      const head = el('tr');
      for (const [, title] of cols) head.append(el('th', null, title));
      table.append(head);
      for (const row of g.compare.runs) {
        const tr = el('tr');
        for (const [k] of cols) {
          const v = k === 'warning' ? row.warning || row.error : row[k];
          tr.append(el('td', null, v == null ? '' : num(v) && !Number.isInteger(v) ? fmtNum(v) : v));
        }
        table.append(tr);
      }
      const wrap = el('div', 'table-wrap');
      wrap.append(table);
      box.append(wrap);
    }
  }

  // ---- resizing, controls -------------------------------------------------------------------------------
  const resizer = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const id = entry.target.closest('figure').id.slice('chart-'.length);
      const c = charts[id];
      const width = Math.floor(entry.contentRect.width);
      if (c && width > 0 && Math.abs(c.u.width - width) > 1) c.u.setSize({ width, height: c.u.height });
    }
  });
  document.querySelectorAll('figure.chart .plot').forEach((box) => resizer.observe(box));

  $('xaxis').addEventListener('change', (e) => { S.x = e.target.value; dirty.add('charts'); schedule(); });
  $('logy').addEventListener('change', (e) => { S.logY = e.target.checked; dirty.add('charts'); schedule(); });
  $('run-select').addEventListener('change', (e) => select(e.target.value));
  setInterval(() => { if (runList().some((r) => r.status && r.status.state === 'running')) { dirty.add('detail'); schedule(); } }, 5000);

  // ---- the connection ------------------------------------------------------------------------------------
  function setConn(state, note) {
    S.conn = state;
    const conn = $('conn');
    conn.dataset.state = state;
    conn.textContent = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', gone: 'server gone', denied: 'API key needed' }[state];
    const notice = $('notice');
    notice.hidden = !note;
    notice.replaceChildren();
    if (note) notice.append(...note);
  }

  function goneNote() {
    const quote = (p) => (/^[\w@%+=:,./-]+$/.test(p) ? p : `'${p.replace(/'/g, "'\\''")}'`);  // as a shell reads it
    const paths = S.sources.length ? S.sources.map(quote).join(' ') : 'RUN';
    return [document.createTextNode('the watcher stopped; '), el('code', null, `gradlm watch ${paths}`), document.createTextNode(' shows the run again (this page keeps what it has and reconnects by itself if the watcher comes back).')];
  }

  let source = null;
  let failures = 0;
  function connect() {
    source = new EventSource('events' + (key ? `?key=${encodeURIComponent(key)}` : ''));
    source.onopen = () => { failures = 0; setConn('live'); };
    source.onerror = () => {
      failures++;
      if (source.readyState === EventSource.CLOSED) { // the browser gave up (an error status): find out why
        source = null;
        explain();
        return;
      }
      if (failures >= 3) setConn('gone', goneNote());
      else setConn('reconnecting');
    };
    for (const name of ['hello', 'runs', 'file', 'reset', 'rows', 'status']) {
      source.addEventListener(name, (ev) => { handle(name, JSON.parse(ev.data)); schedule(); });
    }
  }

  async function explain() {
    try {
      const ctl = new AbortController();
      const r = await fetch('events' + (key ? `?key=${encodeURIComponent(key)}` : ''), { signal: ctl.signal });
      ctl.abort(); // a 200 here is a live stream: only its status was wanted
      if (r.status === 401) {
        setConn('denied', [document.createTextNode(key ? 'the API key in this address is wrong: ' : 'this watcher needs its API key: '), el('code', null, '/?key=KEY')]);
        return;
      }
    } catch (e) { /* the server is unreachable */ }
    setConn(failures >= 3 ? 'gone' : 'reconnecting', failures >= 3 ? goneNote() : null);
    setTimeout(connect, 2000);
  }

  // a small hook for tests (and curious users): what the charts hold, counted in points rather than pixels
  window.gradlmWatch = {
    runs: () => runList().map((r) => r.name),
    state: S,
    charts: () => Object.keys(charts),
    series: (chart) => (charts[chart] ? charts[chart].u.series.slice(1).map((s) => s.label) : []),
    pointCount(name, key, chart) {
      let n = 0;
      for (const [id, c] of Object.entries(charts)) {
        if (chart && id !== chart) continue;
        c.specs.forEach((sp, i) => {
          if (sp.run.name === name && sp.key === key) n += c.u.data[i + 1].filter((v) => v != null).length;
        });
        if (n) return n;
      }
      return n;
    },
    rows: (name, kind) => { const r = runList().find((x) => x.name === name); return r ? r[kind].length : -1; },
  };

  connect();
})();
