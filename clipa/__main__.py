from clipa.cli import main

main()
