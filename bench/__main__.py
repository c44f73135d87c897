"""`python -m bench`: the CPU suite (stages, peers, real data) and, with a GPU, the GPU stages too.

    python -m bench [--quick]

--quick: sizes up to 256^3, a 128^3 peer volume, 20 EMPS images (minutes, for a smoke run).
"""
import argparse

from bench import compare_methods, stages


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        stages.main(["--sizes", "64,128,256", "--repeats", "2", "--out", "quick_stages"])
        compare_methods.main(["--size", "128", "--particles", "190", "--repeats", "2", "--emps-limit", "20",
                              "--out", "quick_compare"])
    else:
        stages.main([])
        compare_methods.main([])


if __name__ == "__main__":
    main()
