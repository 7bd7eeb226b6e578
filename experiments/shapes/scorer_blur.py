# Up to which Gaussian blur does the scorer still read each kind (small and large, red on white, centred)?
# docs/shapes.md, "Session 7": a decoder that only blurred stars would still have them read as stars.
#   python experiments/shapes/scorer_blur.py
from PIL import ImageFilter

from diffstudio.demo.score import score_prompt
from diffstudio.demo.shapes import Scene, ShapeSpec, render

for kind in ("star", "square", "circle", "triangle"):
    for size in ("small", "large"):
        image = render(Scene(shapes=(ShapeSpec(kind, "red", "center", size),)), 64)
        prompt = f"a red {kind} in the center, white background"
        read = [sigma for sigma in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
                if score_prompt(image.filter(ImageFilter.GaussianBlur(sigma)), prompt)["kind_ok"]]
        print(f"{kind:9s} {size:6s} read at sigma {read}")
