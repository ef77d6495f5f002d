"""``b4m bench``: methods × content-style pairs × prompts × seeds on the built-in world, scored against ground truth.

=================  ==========================================================================================
module             job
=================  ==========================================================================================
``variants``       the methods and ablations (:data:`VARIANTS`) and the protocol (:class:`BenchConfig`)
``units``          one (method, pair) unit: train, sample, score; units and stage-1 runs on disk
``workers``        units spread over worker processes (``python -m b4m.world.bench.workers SPEC``)
``run``            :func:`run_bench`: the whole benchmark, resumable, with its results files
``results``        statistics of the results (intervals, paired differences), ``results.csv``, ``report.html``
``saved``          ``results.json`` read and written, plain or gzip-compressed (the repository's copies)
``selection``      the dev grid's rule: each method's configuration (``bench/dev_grid.py``)
=================  ==========================================================================================


Every method sees the same pairs, the same evaluation prompts (the scenes of :func:`b4m.world.tasks.make_task`, with
the placeholders ``sks`` / ``zwx``) and the same sampling seeds, so every difference between two methods is paired.
For each pair, each method trains its adapter with :func:`b4m.baselines.run_method` (B4M: :func:`b4m.method.run`,
the code ``b4m content``/``style``/``make`` run) on the pair's reference sets
(B4M and its ablations also on the auxiliary sets), then generates one image per (prompt, seed) with the adapter
merged into the base model; the shipped oracle scores each image (:func:`b4m.world.tasks.score_images`).

Stage-1 runs are shared: one ``cache`` dict goes to every :func:`~b4m.baselines.run_method` call, so a content's run
(B4M content run, plain LoRA, B-LoRA run) is trained once and reused by every pair with that content (and direct
merge and ZipLoRA share their plain LoRAs); likewise for styles. Wall time is charged to the method that trained a run
first; ``standalone_seconds_per_pair`` adds the reused runs back, for what one pair would cost alone.

With several GPUs (``b4m bench`` counts them; ``workers`` > 1 in the API) the units run in one worker process per GPU
through :mod:`b4m.sweep`, in waves that keep stage-1 runs trained once (:func:`waves`, :func:`run_units_in_workers`);
this process then reads the units back and writes the same results files (the scores equal one process's, tested
on CPU workers). Without a GPU or with one, everything runs in this process, as before.

Methods (:data:`VARIANTS`; ``--methods`` takes names, ``default``, ``ablations`` or ``all``):

- ``b4m``, ``jttrain``, ``direct_merge``, ``ziplora``, ``blora``: :mod:`b4m.baselines` with the bench's settings;
  ``ziplora-no-sim``: ZipLoRA with the similarity weight λ = 0 (which of its two losses moves the mergers);
- ``base``: the lower bound, the base model with no adapter prompted with the real names instead of placeholders
  (``Task.word_prompts``: what prompting alone gets);
- ``renderer``: the upper bound, the renderer's ground truth of every evaluation scene (its jitter seeded by the
  sampling seed), scored the same way;
- B4M ablations, one setting changed at a time (as :mod:`b4m.method` documents): ``b4m-no-mcp``
  (MCP-I: one-to-one, the content run's only auxiliary set is the pair's style references and vice versa),
  ``b4m-no-mcp2`` (MCP-II: one non-target auxiliary set per run instead of several), ``b4m-no-aux`` (no auxiliary
  sets, routing none), ``b4m-random-init`` (w/o Orth), ``b4m-exact-init``, ``b4m-official-halves``,
  ``b4m-mixed-routing``, ``b4m-no-precond`` (AdamW in make), ``b4m-make0`` (fuse only), ``b4m-up-lr4`` and
  ``b4m-up-lr16`` (the up half B at 4× / 16× the lr, LoRA+-style), ``b4m-rank16``, make's data:
  ``b4m-make20``, ``b4m-make50``, ``b4m-make100``, ``b4m-make200`` (make's steps; the bench's default is 100),
  ``b4m-make-lr2e-3`` (make's lr; the default is half the stage-1 lr),
  ``b4m-make-routed`` (each concept's loss trains only its half),
  ``b4m-make-style-equal`` (style references weighted 1, the paper's; the default is 0.5), ``b4m-d0`` …
  ``b4m-d7/8`` (frozen ratio d; ``b4m`` itself is d = 1/2).

Outputs in the output folder: ``results.json`` (settings, device, date, commit, per-method wall time, per-image
scores, per-method means with 95% intervals, paired bootstrap differences of every method against ``b4m``, per-pair
means), ``results.csv`` (one row per method × metric), ``report.html`` (a table per method, image grids per pair),
``units/`` (each finished (method, pair): images, scores, seconds) and ``stage1/`` (the stage-1 adapters), which
``resume=True`` reads back so a long protocol can run as several commands (``max_minutes`` stops between units), and
``runs/`` (the runs' checkpoints, only with ``keep_runs=True``).

Intervals: with two or more pairs every interval is a crossed bootstrap that resamples whole contents and whole
styles (a concept's stage-1 runs and plain LoRAs are shared by all its pairs, so pairs are not independent;
:mod:`b4m.metrics.stats`); results written before 2026-12-04 resampled pairs (``"intervals"`` in results.json says
which, and ``python bench/intervals.py FOLDER…`` recomputes them); with one pair, proportions get Wilson intervals
and other scores an item bootstrap, and the paired differences resample items.
"""
