from clipfit.cli import main

main()
