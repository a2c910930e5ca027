#!/usr/bin/env bash
# The main job: fit both mixtures on their default data and write run directories under runs/.
source "$(dirname "$0")/setup.sh"
zoo data fetch mnist
zoo fit gmm --data faithful --components 2 --out runs/gmm-faithful --overwrite
zoo sample runs/gmm-faithful --num-samples 300
zoo fit bmm --data mnist --components 100 --out runs/bmm-mnist --overwrite
zoo sample runs/bmm-mnist --num-samples 100
echo "done: see runs/gmm-faithful and runs/bmm-mnist (metrics.json, *.png)"
