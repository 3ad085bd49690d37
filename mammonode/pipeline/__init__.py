"""NYU's pipelines, pure: prepared views + weights + options in, a PipelineResult out (no
database, no network, no process-global settings). Stages: crop, optimal centres, patch
heatmaps, view-wise cancer classifiers, density; one model registry."""
