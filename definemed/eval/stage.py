"""`eval` stage: MC benchmarks, pairwise judging, instruction following, extractive QA, failure modes, held-out
perplexity, retention of distilled students, one report.

Order keeps peak memory bounded: MC scoring runs `parallel_models` local engines at a time (a Ray task per model,
placed as resources allow), then the serve app hosts the candidates and the judge for generation, judging,
instructions and QA, and is shut down before perplexity and the analysis; retention reads all of their per-item
results at the end.
Every step resumes: MC results per model, answers and judgments are cached under output_dir.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from definemed.config import ConfigError
from definemed.data.loaders import load_mc_items, load_prompts
from definemed.data.schemas import MCItem, PromptItem
from definemed.eval.cache import stable_key
from definemed.eval.client import Endpoint, endpoint_from_config
from definemed.eval.config import EvalConfig, EvalModel
from definemed.io import atomic_write_json
from definemed.lineage import write_manifest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- MC
def _score_model(name: str, path: str, engine: dict, items: list[dict], prompts: list[str], scoring: dict,
                 chat_template: bool) -> list[dict]:
    """Runs where Ray puts it (a GPU node on a cluster): build the engine, score, free the engine."""
    import gc

    from definemed.engine import EngineConfig, make_llm
    from definemed.eval.mc import MCScoringConfig, TransformersScorer, VllmScorer, predict

    sc = MCScoringConfig(**scoring)
    its = [MCItem(**it) for it in items]
    llm = scorer = None
    try:
        if sc.backend == "vllm" or sc.mode == "generate":
            llm = make_llm(path, EngineConfig(**engine), sole_engine=True)
            scorer = VllmScorer(llm, chat_template=chat_template, batch_size=sc.batch_size)
        else:
            scorer = TransformersScorer.from_path(path, chat_template, EngineConfig(**engine).max_model_len)
        preds = predict(name, its, prompts, sc, scorer=scorer, llm=llm, chat_template=chat_template)
        truncated = getattr(scorer, "truncated", 0)
        if truncated:
            log.warning("[%s] %d MC prompt(s) cut to the context length (kept the end)", name, truncated)
        return [{**asdict(p), "truncated_prompts": truncated} for p in preds]
    finally:
        del llm, scorer
        gc.collect()


def _task_options(engine, cpus: int = 1) -> tuple[Any, dict[str, Any]]:
    """The engine with its device fixed (from config and the Ray cluster, never this driver), and the Ray task
    options for it: the engine's GPUs, or `cpus` CPUs on CPU (Ray sets a task's torch threads to its num_cpus)."""
    from definemed.engine import task_resources

    engine = engine.resolve()
    opts = task_resources(engine)
    if not opts.get("num_gpus"):
        opts["num_cpus"] = cpus
    return engine, opts


def _scored_models(cfg: EvalConfig, names: list[str], extra: dict[str, str] | None = None) -> dict[str, tuple]:
    """name -> (resolved path, engine config) for config models, plus extra (name -> dir, e.g. frontier points)
    with the engine of the first of them."""
    from definemed.models import resolve_model

    out = {n: (resolve_model(cfg.models[n].path), cfg.models[n].engine) for n in names}
    engine = cfg.models[names[0]].engine if names else next(iter(cfg.models.values())).engine
    out.update({n: (p, engine) for n, p in (extra or {}).items()})
    return out


def run_mc(cfg: EvalConfig, out: Path, extra: dict[str, str] | None = None) -> list[dict]:
    import ray

    from definemed.eval.mc import build_prompts
    from definemed.ray_utils import as_completed

    assert cfg.mc is not None
    items: list[MCItem] = []
    for src in cfg.mc.sources:
        items += load_mc_items(src)
    generate = cfg.mc.scoring.mode == "generate"
    prompts = build_prompts(items, cfg.mc.prompt, generate=generate)
    out.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[dict]] = {}
    jobs: list[tuple[tuple[str, str, str], Any]] = []  # ((name, path, fingerprint), submit)
    models = _scored_models(cfg, cfg.mc_models(), extra)
    for name, (path, engine) in models.items():
        scoring = cfg.mc.scoring
        if extra and name in extra and cfg.frontier is not None:  # frontier points: the frontier's backend
            scoring = scoring.model_copy(update={"backend": cfg.frontier.backends[0]})
        fp = stable_key("mc", path, engine.model_dump(), cfg.mc.model_dump(mode="json"), scoring.model_dump(),
                        [it.model_dump() for it in items])
        f = out / f"{name}.json"
        if f.exists():
            saved = json.loads(f.read_text(encoding="utf-8"))
            if saved.get("fingerprint") == fp:
                log.info("[mc] %s: reusing %s", name, f)
                by_model[name] = saved["predictions"]
                continue
        cpus = (os.cpu_count() or 1) if scoring.backend == "transformers" else 1  # torch threads = task CPUs
        engine, opts = _task_options(engine, cpus=cpus)
        task = ray.remote(max_retries=0, max_calls=1, **opts)(_score_model)  # one engine per process
        args = (name, path, engine.model_dump(), [it.model_dump() for it in items], prompts, scoring.model_dump(),
                cfg.mc.prompt.chat_template)
        jobs.append(((name, path, fp), partial(task.remote, *args)))
    for (name, path, fp), preds in as_completed(jobs, cfg.parallel_models, desc="mc models", unit="model"):
        if len(preds) != len(items):
            raise RuntimeError(f"[mc] {name}: {len(preds)} predictions for {len(items)} items")
        atomic_write_json(out / f"{name}.json",
                          {"fingerprint": fp, "model": name, "path": path, "predictions": preds})
        by_model[name] = preds
    return [p for name in models for p in by_model[name]]


# ---------------------------------------------------------------- perplexity
def run_perplexity(cfg: EvalConfig, out: Path, extra: dict[str, str] | None = None) -> dict[str, dict]:
    """Per model and set: predicted-token counts and summed NLLs per document under each backend (cached per
    model; extra models, the frontier's points, use the frontier's backends)."""
    import ray

    from definemed.eval.perplexity import fingerprint_sets, load_set, prepare_docs, read_cached, score_model
    from definemed.ray_utils import as_completed

    pc = cfg.perplexity
    assert pc is not None
    sets = {name: load_set(st) for name, st in pc.sets.items()}
    for name, docs in sets.items():
        if not docs:
            raise ConfigError(f"invalid config field 'perplexity.sets.{name}': no documents in {pc.sets[name].path}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "documents.json", {n: [i for i, _ in d] for n, d in sets.items()})
    results: dict[str, dict] = {}
    jobs: list[tuple[tuple[str, str, str], Any]] = []  # ((name, path, fingerprint), submit)
    models = _scored_models(cfg, cfg.perplexity_models(), extra)
    for name, (path, engine) in models.items():
        backends = list(cfg.frontier.backends if extra and name in extra else pc.backends)
        fp = stable_key("ppl", path, engine.model_dump(), backends, pc.max_tokens, fingerprint_sets(sets))
        cached = read_cached(out / f"{name}.json", fp)
        if cached is not None:
            results[name] = cached
            continue
        docs = prepare_docs(path, sets, pc.max_tokens)
        # On the CPU build give each task every core (Ray sets a task's torch threads to its num_cpus); with
        # parallel_models > 1 the overlap is mostly process and engine start-up.
        engine, opts = _task_options(engine, cpus=os.cpu_count() or 1)
        task = ray.remote(max_retries=0, max_calls=1, **opts)(score_model)  # one engine per process
        jobs.append(((name, path, fp), partial(task.remote, path, docs, backends, engine.model_dump())))
    for (name, path, fp), per_set in as_completed(jobs, cfg.parallel_models, desc="perplexity models",
                                                  unit="model"):
        atomic_write_json(out / f"{name}.json",
                          {"fingerprint": fp, "model": name, "path": path, "per_set": per_set})
        results[name] = per_set
    return {name: results[name] for name in models}


# ---------------------------------------------------------------- hosting
class Hosting:
    """Starts our serve app for the models that have no endpoint, on first use only."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self._ep = None
        self.ids: dict[str, str] = {}  # eval name -> served id
        self.specs: list[dict] = []
        by_path: dict[tuple, str] = {}
        refs = list(cfg.models.items()) + ([("judge", cfg.judge)] if cfg.judge is not None else [])
        for name, ref in refs:
            if ref.endpoint is not None:
                continue
            key = (ref.path, json.dumps(ref.engine.model_dump(), sort_keys=True))
            if key in by_path:  # e.g. a tiny judge that is also a candidate: one deployment
                self.ids[name] = by_path[key]
                continue
            by_path[key] = name
            self.ids[name] = name
            self.specs.append({"id": name, "model": ref.path, "engine": ref.engine.model_dump()})

    def _launch(self) -> tuple[str, str]:
        if self._ep is None:
            from serve import ServeConfig, launch

            from definemed.models import resolve_model

            h = self.cfg.hosting
            models = [{**s, "model": resolve_model(s["model"])} for s in self.specs]
            scfg = ServeConfig.model_validate({"app_name": "definemed-eval", "host": h.host, "port": h.port,
                                               "ready_timeout_s": h.ready_timeout_s, "models": models, **h.serve})
            log.info("[eval] hosting %s with the serve app", ", ".join(s["id"] for s in self.specs))
            self._ep = launch(scfg)
        return self._ep.base_url, self._ep.api_key

    def endpoint(self, name: str, ref: EvalModel) -> Endpoint:
        if ref.endpoint is not None:
            return endpoint_from_config(ref.endpoint)
        return Endpoint(base_url=None, model=self.ids[name], resolve=self._launch)

    def shutdown(self) -> None:
        if self._ep is not None:
            self._ep.shutdown()
            self._ep = None


# ---------------------------------------------------------------- pairwise
def run_pairwise(cfg: EvalConfig, out: Path, hosting: Hosting) -> dict[str, Any]:
    from definemed.eval.failure_modes import word_count
    from definemed.eval.generate import generate_answers
    from definemed.eval.judge import answer_flags, judge_pairs, pair_tasks
    from definemed.eval.win_rate import PairResult, combine_orders, summarize

    pw = cfg.pairwise
    assert pw is not None and cfg.judge is not None
    prompts: list[PromptItem] = load_prompts(pw.prompts, pw.categories)
    if pw.limit:
        prompts = prompts[:pw.limit]
    if not prompts:
        raise ConfigError(f"invalid config field 'pairwise.prompts': no prompts in {pw.prompts}")
    in_pairs = {m for pair in pw.pairs for m in pair}
    gen_models = list(cfg.models) if cfg.failure_modes is not None else [m for m in cfg.models if m in in_pairs]
    answers: dict[str, dict[str, str]] = {}
    for name in gen_models:
        recs = generate_answers(name, hosting.endpoint(name, cfg.models[name]), prompts,
                                out / "cache" / "answers.jsonl", pw.generation)
        answers[name] = {pid: r["answer"] for pid, r in recs.items()}
    tasks = pair_tasks(prompts, answers, pw.pairs)
    judgments = judge_pairs(hosting.endpoint("judge", cfg.judge), tasks, out / "cache" / "judgments.jsonl",
                            pw.judge)
    by = {(j["prompt_id"], j["model_a"], j["model_b"]): j for j in judgments}
    comparisons = []
    for cand, opp in pw.pairs:
        results = []
        for p in prompts:
            first, second = by[(p.id, cand, opp)], by[(p.id, opp, cand)]
            outcome, consistent = combine_orders(first["verdict"], second["verdict"])
            results.append(PairResult(p.id, cand, opp, outcome, consistent, word_count(answers[cand][p.id]),
                                      word_count(answers[opp][p.id])))
        comparisons.append({"candidate": cand, "opponent": opp,
                            **summarize(results, n_boot=cfg.report.n_boot, seed=cfg.report.seed),
                            "pairs": [asdict(r) for r in results]})
    return {"prompts": [p.model_dump() for p in prompts], "answers": answers, "comparisons": comparisons,
            "flags": answer_flags(judgments), "judge": hosting.ids.get("judge") or cfg.judge.endpoint.model,
            "unparsed_judgments": sum(j["verdict"] == "unparsed" for j in judgments),
            "judgments": len(judgments)}


# ---------------------------------------------------------------- instruction following
def _answer_points(cfg: EvalConfig, items: list, points: dict[str, str], cache_path: Path) -> dict[str, dict]:
    """Answers of the merge frontier's points (not served: a local engine each, in its own Ray task, up to
    `parallel_models` at a time), cached like the served models' answers. name -> set -> item id -> record."""
    import ray

    from definemed.eval.cache import JsonlCache
    from definemed.eval.generate import chat_offline, messages
    from definemed.ray_utils import as_completed

    ic = cfg.instructions
    cache = JsonlCache(cache_path)
    models = _scored_models(cfg, [], points)
    keys: dict[str, list[tuple[str, str, str, list]]] = {}  # name -> [(set, item id, key, messages)]
    jobs = []
    for name, (path, engine) in models.items():
        for set_name, st in ic.sets.items():
            gen = ic.generation_for(set_name)
            for it in items:
                msgs = messages(gen, it.in_lang(st.lang).prompt)
                keys.setdefault(name, []).append((set_name, it.id, stable_key("generate-offline", name, path, msgs,
                                                                              gen.model_dump()), msgs))
        todo = [k for k in keys[name] if k[2] not in cache]
        if not todo:
            continue
        engine, opts = _task_options(engine, cpus=os.cpu_count() or 1)
        task = ray.remote(max_retries=0, max_calls=1, **opts)(chat_offline)
        # one task per point answers both sets: the system prompt is part of each conversation
        gen0 = ic.generation_for(None)
        jobs.append(((name, todo), partial(task.remote, path, engine.model_dump(), [k[3] for k in todo], gen0)))
    for (name, todo), recs in as_completed(jobs, cfg.parallel_models, desc="frontier answers", unit="model"):
        for (set_name, item_id, key, _), rec in zip(todo, recs):
            cache.put({"key": key, "model": name, "prompt_id": item_id, "set": set_name, **rec})
    return {name: {set_name: {item_id: cache.get(key) for s, item_id, key, _ in ks if s == set_name}
                   for set_name in ic.sets} for name, ks in keys.items()}


def instruction_items(cfg: EvalConfig) -> list:
    from definemed.data.loaders import load_instruction_items

    ic = cfg.instructions
    assert ic is not None
    items = load_instruction_items(ic.prompts, ic.splits)[:ic.limit]
    if not items:
        raise ConfigError(f"invalid config field 'instructions.prompts': no items in {ic.prompts}"
                          + (f" for splits {ic.splits}" if ic.splits else ""))
    return items


def ask_instructions(cfg: EvalConfig, out: Path, hosting: Hosting, items: list) -> dict[str, dict]:
    """Answers of every served model to every instruction set, through its chat route: model -> set -> item id
    -> record."""
    from definemed.data.schemas import PromptItem
    from definemed.eval.generate import generate_answers

    ic = cfg.instructions
    answers: dict[str, dict[str, dict]] = {}
    for name in cfg.instruction_models():
        for set_name, st in ic.sets.items():
            prompts = [PromptItem(id=it.id, category=it.category, prompt=it.in_lang(st.lang).prompt) for it in items]
            answers.setdefault(name, {})[set_name] = generate_answers(
                f"{name}/{set_name}", hosting.endpoint(name, cfg.models[name]), prompts,
                out / "cache" / "instructions.jsonl", ic.generation_for(set_name))
    return answers


def score_instructions(cfg: EvalConfig, items: list, answers: dict[str, dict], points: set[str]) -> dict[str, Any]:
    """Every model's answers checked and gated: one row per model and set (score_set)."""
    from definemed.eval.instructions import score_set

    ic = cfg.instructions
    rows = []
    for name, by_set in answers.items():
        for set_name, st in ic.sets.items():
            res = score_set(items, by_set[set_name], st.lang, n_boot=cfg.report.n_boot, seed=cfg.report.seed)
            rows.append({"model": name, "set": set_name, "point": name in points, **res})
    texts = {name: {s: [by_set[s][it.id]["answer"] for it in items] for s in by_set} for name, by_set in
             answers.items()}
    return {"rows": rows, "items": [it.id for it in items], "splits": ic.splits,
            "sets": {n: st.model_dump() for n, st in ic.sets.items()},
            "generation": ic.generation.model_dump(exclude={"retry"}), "answers": texts}


# ---------------------------------------------------------------- extractive QA
def qa_items(cfg: EvalConfig) -> tuple[list, list]:
    """(scored items, one-shot exemplar pool) of the QA section."""
    from definemed.eval.qa import load_qa_items, split_items

    assert cfg.qa is not None
    return split_items(load_qa_items(cfg.qa.path), cfg.qa.limit)


def ask_qa(cfg: EvalConfig, out: Path, hosting: Hosting, items: list, pool: list) -> dict[str, dict]:
    """Every QA model's answers in every mode, through its chat route: model -> mode -> item id -> record."""
    from definemed.eval.generate import generate_chats
    from definemed.eval.qa import conversation

    qc = cfg.qa
    gen = qc.generation_config()
    answers: dict[str, dict[str, dict]] = {}
    for name in cfg.qa_models():
        for mode in qc.modes:
            chats = [(it.id, conversation(it, mode, pool, qc.system_prompt)) for it in items]
            answers.setdefault(name, {})[mode] = generate_chats(
                f"{name}/qa-{mode}", hosting.endpoint(name, cfg.models[name]), chats, out / "cache" / "qa.jsonl", gen)
    return answers


def score_qa(cfg: EvalConfig, items: list, pool: list, answers: dict[str, dict]) -> dict[str, Any]:
    """EM and F1 per model and mode, with CIs and per-item scores (score_answers)."""
    from definemed.eval.qa import pick_exemplar, score_answers

    qc = cfg.qa
    trained = None
    if qc.trained_on:
        from definemed.train.split import trained_ids

        trained = trained_ids(qc.trained_on)
    rows = [{"model": name, "mode": mode, **score_answers(items, by_mode[mode], n_boot=cfg.report.n_boot,
                                                          seed=cfg.report.seed, trained=trained)}
            for name, by_mode in answers.items() for mode in qc.modes]
    exemplars = {it.id: pick_exemplar(it, pool).id for it in items} if "one_shot" in qc.modes else {}
    return {"rows": rows, "path": qc.path, "modes": qc.modes, "items": [it.id for it in items],
            "exemplars": exemplars, "system_prompt": qc.system_prompt,
            "generation": qc.generation.model_dump(exclude={"retry"}), "trained_on": qc.trained_on,
            "from_trained_documents": None if trained is None else sum(it.doc_id in trained for it in items)}


# ---------------------------------------------------------------- failure modes
def _tokenizer(ref: EvalModel):
    from definemed.models import resolve_model

    src = ref.tokenizer or ref.path
    if not src:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_model(src))
    except Exception as e:  # noqa: BLE001 - token counts are optional; words are always reported
        log.warning("no tokenizer for token counts from %s (%s)", src, type(e).__name__)
        return None


def german_answer_sets(cfg: EvalConfig, pair: dict[str, Any] | None,
                       instr: dict[str, Any] | None) -> dict[str, dict[str, list[str]]]:
    """The German answers the failure modes read: set name -> model -> answers (same prompts for every model).
    The clinical prompts' answers (pairwise), and each German instruction set's, for the configured models."""
    sets: dict[str, dict[str, list[str]]] = {}
    if pair is not None:
        sets["clinical"] = {name: [a[p["id"]] for p in pair["prompts"]] for name, a in pair["answers"].items()}
    if instr is not None:
        for set_name, st in instr["sets"].items():
            if st["lang"] == "de":
                sets[f"instructions-{set_name}"] = {m: by[set_name] for m, by in instr["answers"].items()
                                                    if m in cfg.models}
    return sets


def run_failure_modes(cfg: EvalConfig, answer_sets: dict[str, dict[str, list[str]]],
                      pair: dict[str, Any] | None = None) -> list[dict]:
    from definemed.eval.failure_modes import LanguageMixDetector, TypoCounter, analyze_model, load_allowlist
    from definemed.eval.judge import flag_counts

    fm = cfg.failure_modes
    assert fm is not None
    allow = load_allowlist(fm.allowlist_paths)
    lang = LanguageMixDetector(languages=tuple(fm.languages), min_words=fm.min_words,
                               min_confidence=fm.min_confidence, allowlist=allow)
    typo = TypoCounter(allowlist=allow, dictionary=fm.dictionary)
    judged = {m for c in pair["comparisons"] for m in (c["candidate"], c["opponent"])} if pair else set()
    rows = []
    tokenizers = {name: _tokenizer(ref) for name, ref in cfg.models.items()}
    for set_name, by_model in answer_sets.items():
        for name, texts in by_model.items():
            flags = flag_counts(pair["flags"], name) if set_name == "clinical" and name in judged else None
            res = analyze_model(name, texts, lang, typo, tokenizer=tokenizers[name], flags=flags,
                                n_boot=cfg.report.n_boot, seed=cfg.report.seed)
            rows.append({**res.row(), "set": set_name, "words": res.words, "tokens": res.tokens,
                         "examples": res.examples})
    return rows


def _scored_paths(cfg: EvalConfig) -> dict[str, str]:
    from definemed.models import resolve_model

    return {n: resolve_model(r.path) for n, r in cfg.models.items() if r.path}


def _add_perplexity(cfg: EvalConfig, out: Path, points: dict[str, str], preds: list[dict],
                    results: dict[str, Any]) -> dict:
    """Perplexity rows (and the frontier's) into results; returns the per-document NLLs of the config's models."""
    from definemed.eval.frontier import cleanup, frontier_rows
    from definemed.eval.perplexity import summarize

    per_doc = run_perplexity(cfg, out / "perplexity", extra=points or None)
    pc = cfg.perplexity
    rows = summarize(per_doc, n_boot=cfg.report.n_boot, seed=cfg.report.seed, tolerance=pc.agreement_tolerance)
    results["perplexity"] = {"table": rows, "max_tokens": pc.max_tokens, "backends": pc.backends,
                             "sets": {n: st.model_dump(mode="json") for n, st in pc.sets.items()},
                             "tolerance": pc.agreement_tolerance}
    if cfg.frontier is not None:
        instr = (results.get("instructions") or {}).get("rows")
        results["frontier"] = {"rows": frontier_rows(cfg.frontier, rows, preds, instr), **cfg.frontier.model_dump()}
        if not cfg.frontier.keep_models:
            cleanup(points)
    return {m: per_doc[m] for m in cfg.perplexity_models()}


def _add_retention(cfg: EvalConfig, out: Path, per_doc: dict | None, preds: list[dict],
                   results: dict[str, Any]) -> None:
    """Student ÷ teacher on every metric of the run and KD vs CE-only, into results and retention.json."""
    from definemed.eval import retention

    rc = cfg.retention
    assert rc is not None
    paths = _scored_paths(cfg)
    res = retention.compute(rc, per_doc=per_doc, instr=results.get("instructions"),
                            mc_preds=[p for p in preds if p["model"] in rc.models()] or None,
                            mc_table=(results.get("mc") or {}).get("table"), qa=results.get("qa"),
                            model_dirs={m: paths.get(m) for m in rc.models()}, n_boot=cfg.report.n_boot,
                            seed=cfg.report.seed)
    res["meaningless"] = results.get("meaningless")
    retention.write_json(res, out / "retention.json")
    results["retention"] = res


# ---------------------------------------------------------------- stage entry
def run(cfg: EvalConfig) -> dict[str, str]:
    from definemed.eval.report import is_meaningless, write_report

    out = Path(cfg.output_dir)
    results: dict[str, Any] = {"models": {n: r.model_dump(mode="json") for n, r in cfg.models.items()}}
    for ref in results["models"].values():
        if ref.get("endpoint"):
            ref["endpoint"].pop("api_key_file", None)
    points: dict[str, str] = {}
    if cfg.frontier is not None:
        from definemed.eval.frontier import build_points

        points = build_points(cfg.frontier, _scored_paths(cfg), out / "frontier")
    preds: list[dict] = []
    if cfg.mc is not None:
        from definemed.eval.mc import MCPrediction, accuracy_table

        preds = run_mc(cfg, out / "mc", extra=points if cfg.frontier and cfg.frontier.mc else None)
        objs = [MCPrediction(**{k: v for k, v in p.items() if k != "truncated_prompts"}) for p in preds]
        results["mc"] = {"table": accuracy_table(objs, n_boot=cfg.report.n_boot, seed=cfg.report.seed),
                         "prompt": cfg.mc.prompt.model_dump(), "scoring": cfg.mc.scoring.model_dump(),
                         "predictions_dir": str(out / "mc")}
    pair = instr = qa = None
    if cfg.pairwise is not None or cfg.instructions is not None or cfg.qa is not None:
        items = instruction_items(cfg) if cfg.instructions is not None else []
        qa_scored, qa_pool = qa_items(cfg) if cfg.qa is not None else ([], [])
        hosting = Hosting(cfg)
        try:
            if cfg.pairwise is not None:
                pair = run_pairwise(cfg, out, hosting)
            answers = ask_instructions(cfg, out, hosting, items) if cfg.instructions is not None else {}
            qa_answers = ask_qa(cfg, out, hosting, qa_scored, qa_pool) if cfg.qa is not None else {}
        finally:
            hosting.shutdown()
        if cfg.qa is not None:
            qa = score_qa(cfg, qa_scored, qa_pool, qa_answers)
        if cfg.instructions is not None:
            # the frontier's points are not served: a local engine each, once the served replicas are gone
            asked = points if cfg.frontier is not None and cfg.frontier.instructions else {}
            if asked:
                answers.update(_answer_points(cfg, items, asked, out / "cache" / "instructions.jsonl"))
            instr = score_instructions(cfg, items, answers, set(asked))
    if pair is not None:
        results["pairwise"] = {k: v for k, v in pair.items() if k not in ("answers", "flags", "prompts")}
        atomic_write_json(out / "answers.json", {"prompts": pair["prompts"], "answers": pair["answers"]})
    if instr is not None:
        results["instructions"] = {k: v for k, v in instr.items() if k != "answers"}
        atomic_write_json(out / "instruction_answers.json", {"items": instr["items"], "answers": instr["answers"]})
    if qa is not None:
        results["qa"] = qa
    if cfg.failure_modes is not None and (pair is not None or instr is not None):
        results["failure_modes"] = run_failure_modes(cfg, german_answer_sets(cfg, pair, instr), pair)
    per_doc = _add_perplexity(cfg, out, points, preds, results) if cfg.perplexity is not None else None
    results["meaningless"] = is_meaningless(cfg)
    if cfg.retention is not None:
        _add_retention(cfg, out, per_doc, preds, results)
    atomic_write_json(out / "results.json", results)
    # the lineage manifest sits beside the report (run_stage rewrites it at the end with the outputs)
    write_manifest(out, "eval", cfg, inputs=cfg.lineage_inputs())
    paths = write_report(cfg, results, out)
    return {"results": str(out / "results.json"), **paths}
