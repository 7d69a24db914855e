"""The aligned head's "before" accuracy on minilm-polarity for several verbaliser templates.

    python benchmarks/aligned_templates.py --threads 2

For each template set (class 0 first, several texts per class separated by "|", classes
by ";"), the encoder's own embeddings of the texts give the head's directions
(edgetrain.tasks.text.verbaliser_directions); the temperature and biases are fitted on
the 512 training sentences (fit_scale_and_bias). Prints the test accuracy of the argmax
of the cosines (zero-shot: no label used), of the fitted head (what
``minilm-polarity-aligned`` starts from) and the training loss, beside the linear probe's.
The frozen features are computed once (about 20 s on 2 cores); the probe comes from the
cache.
"""

from __future__ import annotations

import argparse
import time

import torch

from edgetrain import tasks
from edgetrain.tasks import text

DEFAULT_SETS = [
    "It was terrible.;It was great.",
    "terrible;great",
    "A negative review.;A positive review.",
    "It was terrible.|terrible|A negative review.;It was great.|great|A positive review.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sets", nargs="*", default=DEFAULT_SETS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = tasks.get("minilm-polarity")
    net = task.pretrained()
    probe = task.before_figures()["probe"]
    start = time.perf_counter()
    train, test = task.train.datasets, task.test.datasets
    f_train = task._raw_features(net, train)  # (N_train, H), as the heads read them
    f_test = task._raw_features(net, test)  # (N_test, H)
    print(f"features {time.perf_counter() - start:.1f}s; linear probe {100 * probe:.1f}%")
    print("| templates (class 0; class 1) | zero-shot % | fitted s, b % | s | train NLL |")
    print("| --- | --- | --- | --- | --- |")
    for spec in args.sets:
        templates = text.check_templates(
            [tuple(t.strip() for t in cls.split("|")) for cls in spec.split(";")], 2
        )
        directions = text.verbaliser_directions(net, templates, task.tokenizer(), 64)
        cos_train = text.aligned_logits(f_train, directions, 1.0, None)  # (N_train, 2)
        cos_test = text.aligned_logits(f_test, directions, 1.0, None)  # (N_test, 2)
        scale, bias = text.fit_scale_and_bias(cos_train, train["labels"])
        zero_shot = float((cos_test.argmax(-1) == test["labels"]).double().mean())
        fitted = float(((scale * cos_test + bias).argmax(-1) == test["labels"]).double().mean())
        nll = float(torch.nn.functional.cross_entropy(scale * cos_train + bias, train["labels"]))
        shown = "; ".join(" + ".join(repr(t) for t in cls) for cls in templates)
        print(
            f"| {shown} | {100 * zero_shot:.1f} | {100 * fitted:.1f} | {scale:.1f} | {nll:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
