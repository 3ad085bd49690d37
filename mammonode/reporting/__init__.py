"""Result objects as pure functions of a PipelineResult and the source headers: the TID 1500
SR, the heatmap Secondary Captures and the summary image. No database, no files, no network."""
