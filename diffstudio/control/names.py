"""The annotators' names, without importing them: the command line, the HTTP API and the web UI list these."""

WEIGHT_FREE = ("canny", "lineart", "softedge", "tile", "blur")  # ours, from the pixels alone
LEARNED = ("hed", "lineart_realistic", "lineart_coarse")  # built in; weight files from the annotator folder
DETECTED = ("depth", "openpose", "normal", "mlsd", "pidinet")  # controlnet-aux's; weight files from that folder
ANNOTATORS = (*WEIGHT_FREE, *LEARNED, *DETECTED)
ANNOTATORS_ENV = "DIFFSTUDIO_ANNOTATORS"  # the annotator folder when none is named
