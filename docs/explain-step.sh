#!/bin/sh
# Regenerates docs/explain-step.svg, the picture in docs/explain.md (the default model, seeded).
# Run from the repository root: sh docs/explain-step.sh
exec samplerkit explain --config examples/transformers_order.yaml --seed 1 --set "pipeline[3].min_p=0.5" \
    "Once upon a time, there was a" --token " girl" --plot docs/explain-step.svg
