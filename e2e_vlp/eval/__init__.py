"""Evaluation metrics computed with the official tools, on host numpy arrays.

`coco_detection` (pycocotools COCOeval), `captions` (pycocoevalcap), `vqa` (the official
VQA v2 accuracy) and `retrieval` (recall@K). Import the module you need: each pulls in
only its own dependencies.
"""
