"""maskfreevis_jax.evaluation: YouTube-VIS metrics, video inference post-processing, object tracks
across windows, overlays."""

from maskfreevis_jax.evaluation.inference import (
    StreamedPrediction,
    StreamingVideoPredictor,
    VideoPrediction,
    VideoPredictor,
    associate_queries,
    encode_rle,
    postprocess_video,
    predict_video,
    prediction_to_results,
    run_inference,
)
from maskfreevis_jax.evaluation.track_builder import TrackBuilder, TrackSettings
from maskfreevis_jax.evaluation.visualize import (
    frames_at_original_size,
    ground_truth_and_prediction,
    mask_overlay_image,
    mp4_writer_available,
    overlay_frames,
    save_animation,
    save_ground_truth_and_prediction,
)
from maskfreevis_jax.evaluation.ytvis_eval import (
    accumulate_ytvis,
    evaluate_ytvis,
    format_table,
    mask_iou_video,
)

__all__ = [
    "StreamedPrediction",
    "StreamingVideoPredictor",
    "VideoPrediction",
    "VideoPredictor",
    "associate_queries",
    "encode_rle",
    "postprocess_video",
    "predict_video",
    "prediction_to_results",
    "run_inference",
    "TrackBuilder",
    "TrackSettings",
    "frames_at_original_size",
    "ground_truth_and_prediction",
    "mask_overlay_image",
    "mp4_writer_available",
    "overlay_frames",
    "save_animation",
    "save_ground_truth_and_prediction",
    "accumulate_ytvis",
    "evaluate_ytvis",
    "format_table",
    "mask_iou_video",
]
