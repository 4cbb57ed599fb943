"""lm-evaluation-harness (lm-eval) tasks on a run's model: this project's Transformer, tokenizer
and KV cache behind lm-eval's model interface, so a routed adapter (TeamLoRA, MoELoRA,
HydraLoRA) gets the numbers the field reports. eval.py runs it:

    python eval.py --ckpt runs/teamlora --harness boolq,piqa,arc_easy --limit 200
    python eval.py --base /path/to/base --harness arc_easy          # the base alone: the "before" row
    python eval.py --ckpt runs/lora --harness my_task --harness-include my_tasks/
    torchrun --nproc_per_node 8 eval.py --ckpt runs/teamlora --harness hellaswag

The three requests lm-eval makes (lm_eval.api.model.LM):
- loglikelihood(context, continuation): bos + context + continuation is one row; the summed
  log-probability of the continuation's tokens, and whether greedy decoding would produce them.
  Context and continuation are encoded together and split where the context's own encoding
  stops matching, so the tokens scored are those the model would produce: with context "a:" and
  continuation " yes" a byte-level BPE scores the one token " yes". No EOS is scored (this
  project's own scorer adds one: see README).
- loglikelihood_rolling(text): bos + text in windows of max_length, each token predicted once.
- generate_until(context, {"until": [...], "max_gen_toks": N}): greedy (or sampled, do_sample)
  decoding on the KV cache, a row stopping at EOS, at N tokens or once its text holds a stop
  sequence; the text is cut before the first one.
Requests are sorted by length (longest first) and batched; under torchrun each rank answers
the shard lm-eval gives it (rank, world_size), and lm-eval gathers the metrics on rank 0.
"""
import json
import warnings

import torch
import torch.distributed as dist
from lm_eval import evaluator, utils
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

import common
from data import IGNORE, collate
from model import sample

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")  # the generation settings honoured


class ProjectLM(LM):
    """lm-eval's model interface over a model.Transformer (adapters injected, or none) and its
    model.Tokenizer. batch_size counts rows (sequences) per forward; max_length is the longest row
    (default: the model's max_seq_len), contexts losing tokens from the left beyond it.

    routing: a function of a (B, T) bool mask over the last forward's tokens that returns a
    tensor of routing sums (eval.py's _routing_sums); when given, routing_sums[task] accumulates
    it per lm-eval task over the same forwards that answer the requests. Counted: each distinct
    context of a task once, and every continuation's tokens (all choices, not only the gold one:
    the model does not know which it is), the prompt of a generation and its new tokens."""

    def __init__(self, model, tok, batch_size=32, max_length=None, routing=None, info=None):
        super().__init__()
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.max_length = max_length or model.args.max_seq_len
        self.routing, self.routing_sums = routing, {}
        self.info = info or {}
        self._device = next(model.parameters()).device
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def get_model_info(self):
        """What simple_evaluate records in the results' "config"."""
        return self.info

    # ------------------------------------------------------------------------- the three requests

    def loglikelihood(self, requests):
        rows, seen = [], set()  # seen: the requests and (task, context)s routing has counted
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._split(context, continuation)
            ids = [self.tok.bos_id] + ctx + cont
            # routing counts a context once, then the continuation's inputs; lm-eval pads a short
            # rank's shard with copies of one request, which count nothing
            count_from = (len(ids) if id(req) in seen else len(ids) - len(cont) if (req.task_name, context) in seen
                          else 0)
            seen |= {id(req), (req.task_name, context)}
            rows.append(self._row(ids, len(cont), req.task_name, count_from))
        return self._score(rows)

    def loglikelihood_rolling(self, requests):
        rows, owner, seen = [], [], set()
        for i, req in enumerate(requests):
            ids = self.tok.encode(req.args[0], bos=False, eos=False)
            for ctx, pred in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    ids, self.tok.bos_id, self.max_length, context_len=1)):
                # routing counts the inputs that predict the window's tokens: each input once
                window = ctx + pred
                rows.append(self._row(window, len(pred), req.task_name,
                                      len(window) if id(req) in seen else len(ctx) - 1))
                owner.append(i)
            seen.add(id(req))
        total = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(rows)):
            total[i] += logp
        return total

    def generate_until(self, requests):
        settings = [self._gen_settings(req.args[1]) for req in requests]
        prompts = []
        for req, (_, max_new, _, _) in zip(requests, settings):
            room = max(1, self.max_length - max_new)
            prompts.append(self.tok.encode(req.args[0], bos=True, eos=False)[-room:])
        # a batch holds one sampling setting; longest prompts first
        order = sorted(range(len(requests)), key=lambda i: (settings[i][2:], -len(prompts[i])))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        batches = [[i for i in b if settings[i][2:] == key] for b in batches
                   for key in dict.fromkeys(settings[i][2:] for i in b)]
        out = [""] * len(requests)
        for chunk in self._progress(batches, "generating"):
            texts = self._generate([prompts[i] for i in chunk], [settings[i] for i in chunk],
                                   [requests[i].task_name for i in chunk])
            for i, text in zip(chunk, texts):
                out[i] = text
        return out

    # ------------------------------------------------------------------------- scoring

    def _split(self, context, continuation):
        """(context ids, continuation ids) of context + continuation encoded in one piece, split
        after the longest prefix it shares with the context's own encoding; at least one token
        is scored when there is a continuation."""
        whole = self.tok.encode(context + continuation, bos=False, eos=False)
        own = self.tok.encode(context, bos=False, eos=False)
        n = 0
        while n < min(len(whole), len(own)) and whole[n] == own[n]:
            n += 1
        if continuation and n == len(whole):
            n -= 1
        return whole[:n], whole[n:]

    def _row(self, ids, n_scored, task, count_from):
        """(inputs, targets, task, count_from) of one scored row: ids (bos first) cut from the left
        to max_length + 1, targets IGNORE but at the last n_scored tokens. Routing counts the
        inputs at ids' positions count_from and later."""
        cut = max(0, len(ids) - self.max_length - 1)
        ids, n_scored = ids[cut:], min(n_scored, len(ids) - cut - 1)
        x, y = ids[:-1], [IGNORE] * (len(ids) - 1 - n_scored) + ids[len(ids) - n_scored:]
        return x, y, task, max(count_from - cut, 0)

    @torch.no_grad()
    def _score(self, rows):
        """(summed log-probability of the scored tokens, whether each is the argmax) per row,
        in batches of rows of similar length."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = [(0.0, True)] * len(rows)
        captured = []  # the output layer's logits (N, vocab) at the N scored positions of a batch
        hook = self.model.output.register_forward_hook(lambda module, args, logits: captured.append(logits))
        try:
            for start in self._progress(range(0, len(order), self.batch_size), "scoring"):
                chunk = [i for i in order[start:start + self.batch_size] if rows[i][0]]
                if not chunk:
                    continue
                batch = collate([(rows[i][0], rows[i][1], 0) for i in chunk], self.tok.pad_id)
                targets = batch["targets"].to(self._device)  # (B, T)
                captured.clear()
                nll = self.model(batch["tokens"].to(self._device), targets, reduction="none")  # (B, T)
                keep = targets != IGNORE
                wrong = (captured[-1].argmax(-1) != targets[keep]).to(nll.dtype)  # (N,) a scored token not the argmax
                missed = torch.zeros_like(nll).index_put((keep,), wrong)  # (B, T)
                self._route([rows[i][2] for i in chunk], batch["mask"] & (torch.arange(keep.shape[1]) >=
                            torch.tensor([rows[i][3] for i in chunk])[:, None]))
                for i, logp, greedy in zip(chunk, (-nll.sum(1)).tolist(), (missed.sum(1) == 0).tolist()):
                    out[i] = (logp, greedy)
        finally:
            hook.remove()
        return out

    def _progress(self, batches, desc):
        return tqdm(batches, desc=desc, leave=False, disable=self.rank != 0)

    def _route(self, tasks, mask):
        """Add the last forward's routing over mask (B, T) to each task's sums, row by row's task."""
        if self.routing is None:
            return
        for task in set(tasks):
            mine = mask & torch.tensor([t == task for t in tasks])[:, None]
            if mine.any():
                self.routing_sums[task] = self.routing_sums.get(task, 0) + self.routing(mine)

    # ------------------------------------------------------------------------- generation

    def _gen_settings(self, kwargs):
        """(stop sequences, max new tokens, temperature, top_p) of a request's gen_kwargs."""
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            warnings.warn(f"generation settings not supported, ignored: {unknown}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        return until, int(kwargs.get("max_gen_toks", 256)), temperature, float(kwargs.get("top_p") or 1.0)

    @torch.no_grad()
    def _generate(self, prompts, settings, tasks):
        """The texts of prompts (ids, bos first) decoded on the KV cache. As in model.generate, the
        rows share positions: decoding starts after the shortest prompt and a row still inside its
        prompt takes its own next token, so no row sees padding."""
        model, B = self.model, len(prompts)
        lens = [len(p) for p in prompts]
        limit = [n + s[1] for n, s in zip(lens, settings)]  # one past each row's last allowed token
        temperature, top_p = settings[0][2:]
        tokens = torch.full((B, max(limit)), self.tok.pad_id, dtype=torch.long, device=self._device)  # (B, T)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        new, done = [[] for _ in prompts], [s[1] <= 0 for s in settings]
        model.setup_cache(B, max(limit))
        try:
            prev = 0
            for cur in range(min(lens), max(limit)):
                if all(done):
                    break
                logits = model(tokens[:, prev:cur], start_pos=prev, last_only=True)[:, -1]  # (B, vocab)
                live = torch.tensor([not d for d in done])
                self._route(tasks, live[:, None].expand(B, cur - prev))
                picked = sample(logits, temperature, top_p).tolist()
                for i in range(B):
                    if cur < lens[i] or done[i]:
                        continue
                    tokens[i, cur] = picked[i]
                    if picked[i] == self.tok.eos_id:
                        done[i] = True
                        continue
                    new[i].append(picked[i])
                    text = self.tok.decode(new[i])
                    done[i] = cur + 1 >= limit[i] or any(s in text for s in settings[i][0])
                prev = cur
        finally:
            model.clear_cache()
        texts = []
        for ids, (until, *_) in zip(new, settings):
            text = self.tok.decode(ids)
            for s in until:
                text = text.split(s)[0]
            texts.append(text)
        return texts

    # ------------------------------------------------------------------------- torchrun

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def routed_tasks(self):
        """The tasks any rank collected routing for, sorted (the same list on every rank)."""
        names = [sorted(self.routing_sums)]
        if self.world_size > 1:
            names = [None] * self.world_size
            dist.all_gather_object(names, sorted(self.routing_sums))
        return sorted({t for part in names for t in part})


class UnknownTaskError(ValueError):
    """A task name that neither lm-eval nor the include folder knows (eval.py reports it in one line)."""


def task_manager(tasks, include=None):
    """lm-eval's TaskManager for tasks: over the include folder alone when it has them all (its
    built-in index of thousands of YAMLs takes seconds to build), else over both."""
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if not set(tasks) - set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" nor in {include}" if include else " (a folder of your own YAMLs: --harness-include)"
        raise UnknownTaskError(f"lm-eval has no task {', '.join(map(repr, unknown))}{where}")
    return manager


def evaluate(lm, tasks, include=None, limit=None, num_fewshot=None):
    """lm-eval's results dict (rank 0; None on the others) for a list of task names: its own
    simple_evaluate, without per-sample logs."""
    return evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                     batch_size=lm.batch_size, task_manager=task_manager(tasks, include),
                                     log_samples=False)


def table(results):
    """The results as lm-eval prints them (its make_table), groups after tasks."""
    text = utils.make_table(results)
    if results.get("groups"):
        text += "\n" + utils.make_table(results, "groups")
    return text


def save(results, path):
    """Write results (lm-eval's dict, plus what eval.py adds) as JSON, replacing an earlier file."""
    common.atomic_save(json.dumps(results, indent=1, default=utils.handle_non_serializable), path)
    print(f"lm-eval results -> {path}")
