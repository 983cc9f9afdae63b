"""Check that OUT/evp_random.pth is what produced OUT/eval_logits.pt: build EVPRefer as EVP's
refer/test.py does (test.py:135-140: EVPRefer for the checkpoint's token length, no SyncBN), load
checkpoint['model'] (strictly here: test.py itself uses strict=False), run the eval forward on
OUT/inputs.pt and compare with OUT/eval_logits.pt. Writes OUT/verify_checkpoint.json.

    python tools/evp_reference/verify_checkpoint.py --workspace WORKSPACE [--out DIR] [--threads 2]
"""

import argparse
import json
import os
import time

import run_evp


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", required=True, help="as for run_evp.py")
    parser.add_argument("--out", default=None, help="run_evp.py's output folder (default: WORKSPACE/out)")
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    out = os.path.abspath(options.out or os.path.join(options.workspace, "out"))
    started = time.time()
    run_evp.enter_workspace(options.workspace)
    run_evp.setup_patches()
    import torch

    torch.set_num_threads(options.threads)
    import test as evp_test  # EVP's refer/test.py (nothing runs at import)

    checkpoint = torch.load(os.path.join(out, "evp_random.pth"), map_location="cpu", mmap=True,
                            weights_only=False)
    args = checkpoint["args"]
    model = evp_test.EVPRefer(sd_path="../checkpoints/v1-5-pruned-emaonly.ckpt",
                              neck_dim=[320, 640 + args.token_length, 1280 + args.token_length, 1280])
    report = model.load_state_dict(checkpoint["model"], strict=True)
    del checkpoint
    inputs = torch.load(os.path.join(out, "inputs.pt"))
    expected = torch.load(os.path.join(out, "eval_logits.pt"))["logits"]
    model.eval()
    with torch.no_grad():
        logits = model(inputs["images"], inputs["input_ids"])
    result = {
        "load": {"missing": len(report.missing_keys), "unexpected": len(report.unexpected_keys)},
        "max_abs_diff": float((logits - expected).abs().max()),
        "bitwise_equal": bool(torch.equal(logits, expected)),
        "argmax_agreement": float((logits.argmax(1) == expected.argmax(1)).float().mean()),
        "seconds": round(time.time() - started, 1),
        "peak_rss_gb": round(run_evp.rss_gb(), 2),
    }
    with open(os.path.join(out, "verify_checkpoint.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
