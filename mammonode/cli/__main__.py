from mammonode.cli import main

main()
