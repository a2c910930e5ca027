#!/usr/bin/env bash
# The main job: fit both mixtures on their default data, a short VAE on the 8x8 digits (its
# digits defaults: samples, reconstructions, latent space, an interpolation), compare
# inference methods on the GMM, and write run and report directories under runs/.
source "$(dirname "$0")/setup.sh"
zoo data fetch mnist
zoo fit gmm --data faithful --components 2 --out runs/gmm-faithful --overwrite
zoo sample runs/gmm-faithful --num-samples 300
zoo fit bmm --data mnist --components 100 --out runs/bmm-mnist --overwrite
zoo sample runs/bmm-mnist --num-samples 100
zoo fit vae --data digits --epochs 20 --out runs/vae-digits --overwrite
zoo sample runs/vae-digits --interpolate "0,1;2,3"
zoo compare gmm --data faithful --out runs/compare-gmm-faithful --overwrite
echo "done: see runs/gmm-faithful, runs/bmm-mnist, runs/vae-digits (metrics.json, *.png) and runs/compare-gmm-faithful (table.md)"
