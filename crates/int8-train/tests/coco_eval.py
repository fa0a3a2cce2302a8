"""Runs pycocotools' COCOeval (iouType "bbox") on a COCO ground-truth file and a results file and
prints, as JSON, its 12 summary statistics and each category's AP, AP50 and AP75 (area "all",
maxDets 100): the reference that tests/map.rs compares int8_train::map with."""
import contextlib
import json
import sys

try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ImportError as e:
    print(f"coco_eval.py: pycocotools is missing ({e}); install it with `python3 -m pip install pycocotools` "
          "(scripts/setup does it)", file=sys.stderr)
    sys.exit(3)

if len(sys.argv) != 3:
    print("usage: coco_eval.py GROUND_TRUTH.json RESULTS.json", file=sys.stderr)
    sys.exit(2)

# pycocotools reports its progress on stdout; keep stdout for the JSON.
with contextlib.redirect_stdout(sys.stderr):
    gt = COCO(sys.argv[1])
    ev = COCOeval(gt, gt.loadRes(sys.argv[2]), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()

precision = ev.eval["precision"]  # IoU threshold x recall threshold x category x area x maxDets
per_class = {}
for k, cat in enumerate(ev.params.catIds):
    p = precision[:, :, k, 0, -1]
    if (p > -1).all():  # -1 marks a category without ground truth that counts
        per_class[str(cat)] = {"ap": float(p.mean()), "ap50": float(p[0].mean()), "ap75": float(p[5].mean())}
print(json.dumps({"stats": [float(s) for s in ev.stats], "per_class": per_class}))
