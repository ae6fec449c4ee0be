"""Prompt files of the default world whose correctness under a model is planted (--filter correct)."""

from __future__ import annotations

import json

import numpy as np

import hydra_jax as hj


def write_filter_data(model, tokenizer, path, n_rows: int = 24) -> dict[str, bool]:
    """A JSONL file of the default world's prompts whose correctness is planted: a row's answer is
    the model's clean top token (every other row: correct) or the world's answer when that is
    another token (wrong). Every row is usable (its answer a one-token continuation, never
    unknown). Returns prompt -> whether the model completes it correctly."""
    import jax.numpy as jnp

    from hydra_jax.data import default_world

    facts = default_world().facts("eval")
    prompts, answers = list(facts.prompts[:512]), list(facts.answers[:512])
    logits, _ = hj.run(model, hj.Batch.from_prompts(tokenizer, prompts), capture=())
    tops = np.asarray(jnp.argmax(logits[:, -1], -1)).tolist()
    rows, correct = [], {}
    for prompt, world, top in zip(prompts, answers, tops, strict=True):
        options = {}  # is it correct -> the answer, as the file's reader gives it (one leading space)
        for answer in (" " + tokenizer.decode([top]).strip(), " " + world.strip()):
            enc = tokenizer.answer_tokens([prompt], [answer])[0]
            if enc.answer and not enc.merged and enc.answer[0] != tokenizer.unk_id:
                options.setdefault(enc.answer[0] == top, answer)
        want = len(rows) % 2 == 0  # correct and wrong alternate, skipping prompts that cannot be `want`
        if prompt in correct or want not in options:
            continue
        rows.append({"prompt": prompt, "answer": options[want]})
        correct[prompt] = want
        if len(rows) == n_rows:
            break
    assert len(rows) == n_rows and 0 < sum(correct.values()) < n_rows
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return correct


def pool_by_hand(path, correct: dict[str, bool], seed: int, n: int) -> tuple[list[str], list[str]]:
    """Walk the seeded order until n correct prompts are kept: (kept, pool), pool = every prompt
    examined (all are usable), kept = the correct ones."""
    order = hj.data.load_prompts(path).sample(len(correct), seed).prompts
    pool = []
    for prompt in order:
        if sum(correct[p] for p in pool) == n:
            break
        pool.append(prompt)
    return [p for p in pool if correct[p]], pool
