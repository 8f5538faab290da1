#!/bin/sh
# Installs the real data some tests use, as Debian/Ubuntu packages, where this machine allows:
#   dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist (the Fashion-MNIST tests, the CNN
#                            part of the fine-tuning benchmark and example)
#   wordnet-base          -> /usr/share/wordnet/data.noun (the text fine-tuning data)
# Only as root with apt-get, only for what is missing, one `apt-get update` first. It never
# fails: without root or apt-get, or when an install fails, it says so and the tests that need
# the data skip with a stated reason. Run by `make test` and `make test-slow`.
set -u

FASHION_DIR=/usr/share/datasets/fashion-mnist
WORDNET_FILE=/usr/share/wordnet/data.noun

have_fashion() {
    for stem in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
                t10k-labels-idx1-ubyte; do
        [ -f "$FASHION_DIR/$stem.gz" ] || [ -f "$FASHION_DIR/$stem" ] || return 1
    done
}

have_wordnet() {
    [ -f "$WORDNET_FILE" ]
}

have() {  # PACKAGE: is its data here?
    case "$1" in
        dataset-fashion-mnist) have_fashion ;;
        wordnet-base) have_wordnet ;;
    esac
}

missing=
for pkg in dataset-fashion-mnist wordnet-base; do
    have "$pkg" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-data: not root with apt-get, so not installing:$missing;" \
         "the tests that need it skip (sudo apt-get install$missing, then rerun)"
    exit 0
fi

# A package dpkg lists as installed whose files are gone (removed, or hidden from this process)
# is not reinstalled: apt-get install would do nothing for it.
to_install=
for pkg in $missing; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ]; then
        echo "warning: install-data: $pkg is installed but its files are missing;" \
             "the tests that need it skip (apt-get install --reinstall $pkg restores them)"
    else
        to_install="$to_install $pkg"
    fi
done
[ -z "$to_install" ] && exit 0

if ! apt-get update -qq; then
    echo "warning: install-data: apt-get update failed; trying the install anyway"
fi
for pkg in $to_install; do
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
            >/dev/null; then
        echo "warning: install-data: could not install $pkg; the tests that need it skip"
    elif have "$pkg"; then
        echo "install-data: installed $pkg"
    else
        echo "warning: install-data: installed $pkg, but its data is still missing;" \
             "the tests that need it skip"
    fi
done
exit 0
