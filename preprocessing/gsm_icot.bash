#!/usr/bin/env bash
# Download GSM8K in the Internalize-CoT form (da03/Internalize_CoT_Step_by_Step, the augmented train set
# and the valid/test sets used by Coconut) and convert it to data/gsm_{train,valid,test}.json.
#
# Needs curl or wget and the installed package (the `nbs` command, or PYTHON=... with noblankslate).
# The conversion is `nbs data gsm-icot IN.txt OUT.json`; see docs/data.md.
set -euo pipefail

COMMIT=e06a32ee5e4cd117171daeb4755d2a97ece62761
# train.txt is kept in Git LFS, so it comes from the media host; valid/test are plain files.
LFS_URL=https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/${COMMIT}/data/gsm8k
RAW_URL=https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/${COMMIT}/data/gsm8k

download() {  # URL FILE
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$2" "$1"
    else
        echo "gsm_icot.bash: needs curl or wget to download $1" >&2
        exit 1
    fi
}

nbs_data() {
    if command -v nbs >/dev/null 2>&1; then
        nbs data "$@"
    else
        "${PYTHON:-python}" -c 'import sys; from noblankslate.cli import main; sys.exit(main(sys.argv[1:]))' data "$@"
    fi
}

mkdir -p data
for split in train valid test; do
    if [ "$split" = train ]; then url=$LFS_URL/train.txt; else url=$RAW_URL/$split.txt; fi
    download "$url" "data/gsm_${split}.txt"
    nbs_data gsm-icot "data/gsm_${split}.txt" "data/gsm_${split}.json"
    rm "data/gsm_${split}.txt"
done
