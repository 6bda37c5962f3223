from clipa.cli.app import main

main()
