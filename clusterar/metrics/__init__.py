"""FID, Inception Score and precision/recall of generated images, in PyTorch (no TensorFlow).

The metrics follow the ADM evaluator (guided-diffusion/evaluations), which the field reports. One module
per step of an evaluation:

- `maths`: the metrics on features (Frechet distance, Inception Score, k-NN precision/recall, class
  accuracy);
- `sources`: the images, in uint8 batches: an array / tensor in memory, an ADM-style .npz (`arr_0` uint8
  [N, H, W, 3], streamed in batches), a folder of image files, or a bundled split ("mnist:val", also
  :train, :all; likewise "digits:...");
- `extractors`: features and class probabilities (the classifier of clusterar.classifier, or
  Inception-v3 with the standard FID weights the user supplies);
- `reference`: the reference's statistics, computed once and cached next to the classifier (an ADM
  reference batch's stored Inception `mu` / `sigma` are used for FID as ADM does);
- `evaluate`: `evaluate_images`, the whole evaluation, and the table `clusterar evaluate` prints.

The names below are the public API.
"""

from .evaluate import IS_SPLIT_SIZE, evaluate_images, format_table
from .extractors import (
    STANDARD_INCEPTION,
    ClassifierExtractor,
    FeatureExtractor,
    Inception,
    feature_dim,
    make_extractor,
)
from .maths import (
    class_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from .reference import ReferenceStats, reference_statistics
from .sources import (
    ArraySource,
    BundledSource,
    FolderSource,
    ImageSource,
    NpzSource,
    check_labels,
    open_images,
    reference_dataset,
)

__all__ = [
    "IS_SPLIT_SIZE",
    "STANDARD_INCEPTION",
    "ArraySource",
    "BundledSource",
    "ClassifierExtractor",
    "FeatureExtractor",
    "FolderSource",
    "ImageSource",
    "Inception",
    "NpzSource",
    "ReferenceStats",
    "check_labels",
    "class_accuracy",
    "evaluate_images",
    "feature_dim",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "inception_score",
    "make_extractor",
    "manifold_radii",
    "open_images",
    "precision_recall",
    "reference_dataset",
    "reference_statistics",
]
